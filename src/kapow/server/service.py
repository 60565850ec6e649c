"""
The top of the running server's service tree: it starts its children in
order, ends the start with one line on stderr when one of them cannot start,
answers the signals, and stops gracefully (docs/reference/cli.rst, and
docs/howto/systemd.rst for the notifications to systemd).
"""

from __future__ import annotations

import gc
import signal
import sys
from collections.abc import Callable, Generator, Iterable
from types import FrameType
from typing import Any, NoReturn, cast

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.logger import Logger

from kapow.handlers.governor import Governor
from kapow.server.systemd import notify

__all__ = ["USER", "KapowService", "StartupError", "fatal", "startup_message"]

log = Logger()

#: The name of the user interface's listener in the service tree: the one
#: that stops accepting first.
USER = "user"
#: The name of the run history's service, which stops last.
HISTORY = "history"


class StartupError(Exception):
    """The service cannot start; ``str()`` is one line for the operator."""


def fatal(message: str) -> NoReturn:
    """Stop the start with one line on stderr and exit status 1."""
    sys.stderr.write(f"kapow server: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)


def startup_message(e: Exception) -> str:
    """Why a start failed, in one line for the operator."""
    if isinstance(e, CannotListenError):
        why = getattr(e.socketError, "strerror", None) or str(e.socketError)
        if isinstance(e.port, bytes | str) and not str(e.port).isdigit():
            path = e.port.decode(errors="replace") if isinstance(e.port, bytes) else e.port
            return f"cannot listen on {path}: {why}"
        return f"cannot listen on {e.interface or '*'}:{e.port}: {why}"
    return " ".join(str(e).split()) or type(e).__name__


class KapowService(MultiService):
    """
    The whole server. Listeners start first, in order; a listener that cannot
    start ends the process with one line on stderr instead of a traceback.

    Stopping is graceful: the user interface (the child named :data:`USER`)
    stops accepting, running handlers get ``shutdown_timeout`` seconds to
    finish (the data API keeps serving them), then every handler process
    group still alive is ended. The first SIGTERM or SIGINT starts that; a
    second one ends the handlers at once.

    :param reactor: the reactor; once it runs, signal handlers hand their
        work over to it with ``callFromThread``.
    :param governor: the handlers' governor.
    :param shutdown_timeout: seconds to wait for running handlers.
    :param worker: the worker's number, in a worker process of ``--workers``.
    :param reloads: called on SIGHUP: read certificates and auth files again.
    """

    def __init__(
        self,
        reactor: IReactorCore,
        governor: Governor,
        shutdown_timeout: float,
        *,
        worker: int | None = None,
        reloads: Iterable[Callable[[], None]] = (),
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.governor = governor
        self.shutdown_timeout = shutdown_timeout
        self.worker = worker
        #: returns a Deferred that fires once the server serves (all its workers)
        self.serving: Callable[[], Deferred[Any] | None] = lambda: None
        #: called when handlers must end at once (a second signal)
        self.hurry: list[Callable[[], None]] = []
        #: called on SIGHUP: read certificates and auth files again
        self.reloads: list[Callable[[], None]] = list(reloads)
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
        # What the server keeps for its life is built by now (some 70,000
        # objects): frozen, no later collection of the garbage collector walks it
        gc.freeze()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # a worker leaves the terminal's signals to the main process, which tells it when to stop
            signal.signal(sig, signal.SIG_IGN if self.worker is not None else self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)
        if self.worker is None:
            maybeDeferred(self.serving).addCallback(lambda _: notify("READY=1"))

    def _from_signal_handler(self) -> IReactorFromThreads:
        # every reactor that runs signal handlers provides it (posixbase)
        return cast(IReactorFromThreads, self.reactor)

    def _on_hangup(self, signum: int, frame: FrameType | None) -> None:
        self._from_signal_handler().callFromThread(self._hangup)

    def _hangup(self) -> None:
        log.info("received SIGHUP: reading certificates and auth files again")
        self.reload()

    def reload(self) -> None:
        """Read certificates and the routes' auth files again (in every worker too)."""
        for reload in self.reloads:
            reload()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._from_signal_handler().callFromThread(self._stop_signal, signum)

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
    def _stop(self) -> Generator[Deferred[Any], Any, None]:
        notify("STOPPING=1")
        self.governor.stop_admitting()
        user = self.namedServices.get(USER)
        if user is not None and user.running:
            yield user.stopService()
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
        # the history last, once the rest (the workers with the records of their last handlers) has stopped
        history = self.namedServices.get(HISTORY)
        yield gatherResults(
            [maybeDeferred(c.stopService) for c in reversed(list(self)) if c.running and c is not history]
        )
        if history is not None and history.running:
            yield history.stopService()
        Service.stopService(self)

    def _guard(self, start: Callable[[], None]) -> None:
        try:
            start()
        except SystemExit:
            self._failing()
            raise
        except Exception as e:
            self._failing()
            fatal(startup_message(e))

    def _failing(self) -> None:
        for child in self:
            failing = getattr(child, "failing", None)
            if failing is not None:
                failing()
