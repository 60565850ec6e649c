"""
The pieces of the running server's service tree: listeners that fail loudly
and know their real address, the private launcher directory, and the
top-level service that starts in order and stops gracefully.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, NoReturn
from urllib.parse import quote

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.error import CannotListenError, ProcessDone, ReactorNotRunning
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from kapow.commands.launcher import FORKSERVER_SOCKET, write_launcher
from kapow.handlers.governor import Governor
from kapow.server.systemd import child_environ, notify

log = Logger()


class StartupError(Exception):
    """The service cannot start; ``str()`` is one line for the operator."""


def fatal(message: str) -> NoReturn:
    """Stop the start with one line on stderr and exit status 1."""
    sys.stderr.write(f"kapow: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)


class KapowService(MultiService):
    """
    The whole server. Listeners start first, in order; a listener that cannot
    start ends the process with one line on stderr instead of a traceback.

    Stopping is graceful: the user interface stops accepting, running
    handlers get ``shutdown_timeout`` seconds to finish (the data API keeps
    serving them), then every handler process group still alive is ended.
    The first SIGTERM or SIGINT starts that; a second one ends the handlers
    at once.

    :param reactor: the reactor.
    :param governor: the handlers' governor.
    :param shutdown_timeout: seconds to wait for running handlers.
    :param worker: the worker's number, in a worker process of ``--workers``.
    """

    def __init__(
        self, reactor: Any, governor: Governor, shutdown_timeout: float, worker: int | None = None
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.governor = governor
        self.shutdown_timeout = shutdown_timeout
        self.worker = worker
        self.user_listener: Listener | None = None
        #: returns a Deferred that fires once the server serves (all its workers)
        self.serving: Callable[[], Any] = lambda: None
        #: called when handlers must end at once (a second signal)
        self.hurry: list[Callable[[], None]] = []
        #: called on SIGHUP: read certificates and auth files again
        self.reloads: list[Callable[[], None]] = []
        self._stopping: Deferred[None] | None = None
        self._draining: Deferred[None] | None = None
        self.stop_requested = False

    def privilegedStartService(self) -> None:
        if self.worker is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # from the start: Ctrl-C is the main process's
        self._guard(super().privilegedStartService)

    def startService(self) -> None:
        self._guard(super().startService)
        if self.reactor.running:
            self._running()
        else:
            # during startup, right after the reactor's own signal handlers and
            # before anything waiting for it runs (init programs): a SIGTERM
            # from then on is a graceful stop of ours
            self.reactor.addSystemEventTrigger("during", "startup", self._running)

    def _running(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            # a worker leaves the terminal's signals to the main process, which tells it when to stop
            signal.signal(sig, signal.SIG_IGN if self.worker is not None else self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)
        if self.worker is None:
            maybeDeferred(self.serving).addCallback(lambda _: notify("READY=1"))

    def _on_hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._hangup)

    def _hangup(self) -> None:
        log.info("received SIGHUP: reading certificates and auth files again")
        self.reload()

    def reload(self) -> None:
        """Read certificates and the routes' auth files again (in every worker too)."""
        for reload in self.reloads:
            reload()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._stop_signal, signum)

    def _stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if not self.stop_requested:
            log.info("received {name}: stopping gracefully (again to stop at once)", name=name)
            self.stop_gracefully()
            return
        log.warn("received {name} again: ending all handlers now", name=name)
        self.stop_now()

    def stop_gracefully(self) -> None:
        """Stop as :meth:`stopService` does, once; the reactor stops after."""
        if not self.stop_requested:
            self.stop_requested = True
            try:
                self.reactor.stop()
            except ReactorNotRunning:
                pass  # already stopping

    def stop_now(self) -> None:
        """Stop without waiting for running handlers: they are ended at once."""
        self.shutdown_timeout = 0
        self.stop_gracefully()
        if self._draining is not None and not self._draining.called:
            self._draining.callback(None)
        self.governor.end_all(grace=0)
        for hurry in self.hurry:
            hurry()

    def stopService(self) -> Deferred[None]:
        if self._stopping is None:
            self._stopping = self._stop()
        return self._stopping

    @inlineCallbacks
    def _stop(self) -> Any:
        notify("STOPPING=1")
        self.governor.stop_admitting()
        if self.user_listener is not None and self.user_listener.running:
            yield self.user_listener.stopService()
        running = self.governor.running()
        if running:
            log.info(
                "waiting up to {timeout}s for {n} running handlers",
                timeout=self.shutdown_timeout, n=running,
            )  # fmt: skip
            self._draining = self.governor.drain(self.shutdown_timeout)
            yield self._draining
        left = self.governor.running()
        if left:
            log.warn("ending {n} handlers still running", n=left)
        yield self.governor.end_all()
        yield gatherResults(
            [maybeDeferred(child.stopService) for child in reversed(list(self)) if child.running]
        )
        Service.stopService(self)

    def _guard(self, start: Callable[[], None]) -> None:
        try:
            start()
        except SystemExit:
            self._failing()
            raise
        except Exception as e:
            self._failing()
            fatal(_listen_error(e))

    def _failing(self) -> None:
        for child in self:
            failing = getattr(child, "failing", None)
            if failing is not None:
                failing()


def _listen_error(e: Exception) -> str:
    if isinstance(e, CannotListenError):
        why = getattr(e.socketError, "strerror", None) or str(e.socketError)
        if isinstance(e.port, bytes | str) and not str(e.port).isdigit():
            path = e.port.decode(errors="replace") if isinstance(e.port, bytes) else e.port
            return f"cannot listen on {path}: {why}"
        return f"cannot listen on {e.interface or '*'}:{e.port}: {why}"
    return " ".join(str(e).split()) or type(e).__name__


class Listener(StreamServerEndpointService):
    """
    A listening endpoint that fails loudly and remembers its real address.

    :param label: names the interface in logs and errors.
    :param scheme: ``http`` or ``https``, for the logged URL.
    :param host: the host as the operator wrote it, if any.
    :param worker: the number of the worker this listener serves in, if any.
    """

    _raiseSynchronously = True

    def __init__(
        self,
        endpoint: Any,
        factory: Any,
        label: str,
        scheme: str,
        host: str | None,
        worker: int | None = None,
    ) -> None:
        super().__init__(endpoint, factory)
        self.label = label
        self.scheme = scheme
        self.host = host
        self.worker = worker
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            raise StartupError(f"{self.label} interface: {_listen_error(e)}") from e
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        if self.worker is None:
            log.info("{label} interface listening on {url}", label=self.label, url=self.url())
        else:
            log.info(
                "worker {n} serves its {label} interface on {url}",
                n=self.worker,
                label=self.label,
                url=self.url(),
            )
        return port

    def url(self, host: str | None = None) -> str:
        """
        The URL of this listener, with its real port.

        :param host: the host to show instead of the one listened on (e.g.
            the name in the control certificate).
        """
        address = self.port.getHost() if self.port is not None else None
        port = getattr(address, "port", None)
        if getattr(address, "host", None) is None or port is None:
            name = getattr(address, "name", None)
            if isinstance(name, bytes):
                name = name.decode()
            if name:
                return f"{self.scheme}+unix://{quote(name, safe='')}"
            return f"{self.scheme}://{self.host or 'localhost'}"
        shown = host or self.host or ("localhost" if address.host in ("0.0.0.0", "::") else address.host)
        if ":" in shown:
            shown = f"[{shown}]"
        return f"{self.scheme}://{shown}:{port}"


#: The launcher directories' names begin with this, in the temporary directory.
LAUNCHER_PREFIX = "kapow-bin-"
#: The file in a launcher directory that holds the pid of the server it is for.
LAUNCHER_OWNER = "server.pid"


def remove_stale_launcher_dirs(parent: str) -> list[str]:
    """
    Remove the launcher directories in ``parent`` that this user's servers
    left behind when they were killed (a server removes its own when it
    stops): those whose server's pid no longer runs. A directory without
    its pid (being made) or of a process still running is kept.

    :return: the directories removed.
    """
    removed = []
    uid = os.getuid()
    for name in os.listdir(parent):
        if not name.startswith(LAUNCHER_PREFIX):
            continue
        path = os.path.join(parent, name)
        try:
            if os.lstat(path).st_uid != uid:
                continue
            with open(os.path.join(path, LAUNCHER_OWNER)) as f:
                pid = int(f.read())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except (OSError, ValueError):
            continue
    return removed


class LauncherDirectory(Service):
    """
    A private directory holding the ``kapow`` that handlers and init programs
    run, first on their PATH so ``kapow get``/``kapow set`` start fast: the
    native client, or the lean Python launcher; removed when the service
    stops, or by the next server to start if this one was killed.

    With the native client and a ``reactor``, it also runs the pre-started
    ``kapow route`` of :mod:`kapow.commands.forkserver`, listening on
    ``kapow-cli.sock`` in the directory, which the native client uses for
    ``kapow route ...``; it ends when the service stops or the server dies.

    :param native: the path of the native client, or ``None`` for the Python one.
    :param reactor: the reactor to run the forkserver with, or ``None`` for none.
    """

    path: str | None = None
    forkserver: Any = None

    def __init__(self, native: str | None, reactor: Any = None) -> None:
        self.native = native
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        remove_stale_launcher_dirs(tempfile.gettempdir())
        self.path = tempfile.mkdtemp(prefix=LAUNCHER_PREFIX)
        with open(os.path.join(self.path, LAUNCHER_OWNER), "w") as f:
            f.write(str(os.getpid()))
        write_launcher(self.path, native=self.native)
        if self.native is None:
            log.info("handlers get the python data client")
            return
        log.info("handlers get the native data client ({path})", path=self.native)
        if self.reactor is not None:
            self.forkserver = start_forkserver(self.reactor, os.path.join(self.path, FORKSERVER_SOCKET))

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` with the launcher directory first on ``PATH``."""
        env = child_environ(base)
        env["PATH"] = os.pathsep.join(filter(None, (self.path, base.get("PATH", os.defpath))))
        return env

    def stopService(self) -> None:
        super().stopService()
        if self.forkserver is not None:
            self.forkserver.closeStdin()  # its end: see kapow.commands.forkserver
            self.forkserver = None
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def start_forkserver(reactor: Any, socket_path: str) -> Any:
    """
    Listen on the Unix socket ``socket_path`` and start :mod:`kapow.commands.forkserver`
    on it; return its process transport (closing its standard input ends it).
    The socket listens before this returns, so a client that connects while
    the process still starts waits in the backlog instead of falling back.
    """
    import socket

    import kapow

    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listening.bind(socket_path)
        listening.listen(128)
        package_dir = os.path.dirname(os.path.abspath(kapow.__file__))
        # run by its file, with the package's parent on its path: ``-I -S``
        # skips the site processing that would find an editable install
        script = os.path.join(package_dir, "commands", "forkserver.py")
        return reactor.spawnProcess(
            _ForkserverProtocol(),
            sys.executable,
            [sys.executable, "-I", "-S", script, os.path.dirname(package_dir), str(_FORKSERVER_FD)],
            env=dict(os.environ),
            childFDs={0: "w", 1: 1, 2: 2, _FORKSERVER_FD: listening.fileno()},
        )
    finally:
        listening.close()


#: The forkserver's descriptor of its listening socket.
_FORKSERVER_FD = 3


class _ForkserverProtocol(ProcessProtocol):
    def processEnded(self, reason: Any) -> None:
        if not reason.check(ProcessDone):
            log.warn("the kapow route forkserver ended: {reason}", reason=reason.getErrorMessage())
