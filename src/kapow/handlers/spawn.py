"""
Starting handler processes, each in a session (process group) of its own, and
ending whole process groups.

Twisted (23.8+) starts children with ``posix_spawnp``, which never runs the
fork-time ``os.setsid()`` of older recipes. :class:`SessionProcess` passes
``setsid=True`` to ``posix_spawnp`` instead, which costs nothing extra per
spawn (a ``setsid`` program in front of argv would cost one more exec).
It overrides a private method of :class:`twisted.internet.process.Process`;
``tests/test_spawn.py`` checks the behaviour this relies on.

Spawning is on the path of every request, so it does only what a child
needs: the descriptors the child gets are set up, and nothing else is
looked at. Every other descriptor must already be close-on-exec, which
Python makes them from birth (PEP 446); :func:`close_on_exec_from` makes it
so once for the few a process may inherit without (systemd's sockets), and
:class:`Spawner` calls it before its first spawn. The signals the server
ignores are found once, too, and set back to their default in each child.

A handler whose output is discarded needs no pipes, hence no
:class:`~twisted.internet.process.Process`: :func:`spawn_watched` starts it
directly and watches its exit through a pidfd in the reactor (Linux 5.3+),
which spares Twisted's scan of every child at each exit; a worker of
``--workers``, whose only children are such handlers, does not even catch
``SIGCHLD`` (:func:`quiet_sigchld`). Where pidfds are missing, and with
``--debug``, handlers go the Process way.

``posix_spawn`` returns once the child has executed its program; while
other handlers live, :class:`Spawner` waits for that in a thread of its own
(:class:`SpawnThreads`; :mod:`kapow.handlers.libc_spawn` calls the C library without
the interpreter lock), so the reactor serves their requests meanwhile.
:meth:`Spawner.start` therefore answers with a Deferred.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from queue import SimpleQueue
from typing import TypeVar, cast

from twisted.internet import process as _process
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFDSet, IReactorFromThreads, IReactorTime, IReadDescriptor
from twisted.internet.protocol import ProcessProtocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kapow.core.resource_limits import LimitedCommand
from kapow.handlers.libc_spawn import Spawn

log = Logger()

#: Threads a server alone waits in for spawns while other handlers live.
SPAWN_THREADS = 4

_T = TypeVar("_T")


class SpawnError(Exception):
    """The program could not be started; ``str()`` says why, in one line."""


def close_on_exec_from(lowest: int) -> None:
    """Make every open descriptor from ``lowest`` up close-on-exec."""
    for fd in _process._listOpenFDs():
        if fd >= lowest:
            try:
                flags = fcntl.fcntl(fd, fcntl.F_GETFD)
                if not flags & fcntl.FD_CLOEXEC:
                    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            except OSError:
                pass  # the descriptor of the listing itself, closed by now


def ignored_signals() -> tuple[int, ...]:
    """The signals this process ignores (SIGPIPE, SIGXFSZ, and any inherited)."""
    return tuple(s for s in range(1, signal.NSIG) if signal.getsignal(s) == signal.SIG_IGN)


class SessionProcess(_process.Process):
    """
    A :class:`~twisted.internet.process.Process` that leads a new session.
    Only the descriptors of ``childFDs`` are set up in the child; every
    other one of the parent from 3 up must be close-on-exec.

    :param reset_signals: signals to set back to their default in the child
        (the ones the parent ignores).
    :ivar pgid: its process group (its pid); unlike ``pid``, kept after the
        process was reaped.
    """

    pgid: int

    def __init__(
        self,
        reactor: IReactorFDSet,
        executable: str,
        args: list[str],
        environment: Mapping[str, str],
        path: str | None,
        proto: ProcessProtocol,
        childFDs: dict[int, int | str],
        reset_signals: Sequence[int] = (),
    ) -> None:
        self._reset_signals = reset_signals
        super().__init__(reactor, executable, args, environment, path, proto, childFDs=childFDs)

    # Twisted's private hook (twisted.internet.process, 23.8 and later),
    # pinned by tests/e2e/test_spawn.py.
    def _trySpawnInsteadOfFork(
        self,
        path: str | None,
        uid: int | None,
        gid: int | None,
        executable: str,
        args: list[str],
        environment: Mapping[str, str] | None,
        kwargs: Mapping[str, dict[int, int]],
    ) -> bool:
        if uid is not None or gid is not None or path is not None:
            raise SpawnError("uid, gid and path are not supported for handlers")
        fdmap = kwargs.get("fdmap") or {}
        fdState = []
        for fd in {0, 1, 2, *fdmap, *fdmap.values()}:
            try:
                fdState.append((fd, bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)))
            except OSError:
                pass  # not open
        self.pid = self.pgid = os.posix_spawnp(
            executable,
            args,
            os.environ if environment is None else environment,
            file_actions=_process._getFileActions(
                fdState, fdmap, doClose=_process._PS_CLOSE, doDup2=_process._PS_DUP2
            ),
            setsigdef=self._reset_signals,
            setsid=True,
        )
        self.status = -1
        return True


def spawn_in_session(
    reactor: IReactorFDSet,
    protocol: ProcessProtocol,
    argv: Sequence[str],
    env: Mapping[str, str],
    child_fds: Mapping[int, int | str],
    reset_signals: Sequence[int] = (),
) -> SessionProcess:
    """
    Start ``argv`` as the leader of a new session and process group. The
    child gets the descriptors of ``child_fds`` and no other: every other
    one of this process from 3 up must be close-on-exec
    (:func:`close_on_exec_from`).

    :param reactor: a POSIX reactor: the child's pipes are its readers and
        writers, and the process is reaped by its SIGCHLD handling.
    :param child_fds: as ``childFDs`` of ``spawnProcess``: ``"r"``/``"w"``
        for pipes, or a parent descriptor to share.
    :param reset_signals: signals to set back to their default in the child
        (:func:`ignored_signals`).
    :raises SpawnError: if ``argv`` is empty or cannot be executed.
    """
    if not argv or not argv[0]:
        raise SpawnError("empty entrypoint")
    try:
        return SessionProcess(
            reactor,
            argv[0],
            list(argv),
            env,
            None,
            protocol,
            childFDs=dict(child_fds),
            reset_signals=reset_signals,
        )
    except OSError as e:
        raise SpawnError(f"cannot run {argv[0]}: {e.strerror or e}") from e


def pidfds_work() -> bool:
    """Whether this system can watch a process's exit through a pidfd."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def quiet_sigchld() -> None:
    """
    Set ``SIGCHLD`` back to its default, in a process whose only children
    are handlers watched through pidfds (a worker of ``--workers``): the
    reactor's own handler would wake it at every handler's exit only to look
    for Twisted processes it has none of. The default neither interrupts nor
    reaps anything: each handler is still reaped by its :class:`_ExitWatcher`.
    Call it once the reactor runs (it sets its handler as it starts).
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


@implementer(IReadDescriptor)
class _ExitWatcher:
    """Reaps one child when its pidfd becomes readable (it exited) and reports how."""

    def __init__(self, reactor: IReactorFDSet, pid: int, on_exit: ExitCallback) -> None:
        self.reactor = reactor
        self.pid = pid
        self.on_exit = on_exit
        self.fd = os.pidfd_open(pid)
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "handler"

    def doRead(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: it exited, how is unknown
            self._close()
            self.on_exit(None, None)
            return
        if pid == 0:
            return
        self._close()
        if os.WIFSIGNALED(status):
            self.on_exit(None, os.WTERMSIG(status))
        else:
            self.on_exit(os.WEXITSTATUS(status), None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._close()  # the reactor stops; a handler still running was ended before

    def _close(self) -> None:
        if self.fd >= 0:
            self.reactor.removeReader(self)
            os.close(self.fd)
            self.fd = -1


def spawn_watched(
    reactor: IReactorFDSet,
    argv: Sequence[str],
    env: Mapping[str, str],
    stdio: int,
    reset_signals: Sequence[int],
    on_exit: ExitCallback,
    stdin: int | None = None,
) -> int:
    """
    Start ``argv`` as the leader of a new session with ``stdio`` as its 0, 1
    and 2 (``stdin`` as its 0 when given; and, as for
    :func:`spawn_in_session`, no other descriptor), and report its exit to
    ``on_exit`` with (exit status, signal) from the reactor, never before
    this returns. Needs :func:`pidfds_work`.

    :return: its pid, which is its process group.
    :raises SpawnError: if ``argv`` is empty or cannot be executed.
    """
    if not argv or not argv[0]:
        raise SpawnError("empty entrypoint")
    dup = os.POSIX_SPAWN_DUP2
    try:
        pid = os.posix_spawnp(
            argv[0],
            list(argv),
            env,
            file_actions=[(dup, stdio if stdin is None else stdin, 0), (dup, stdio, 1), (dup, stdio, 2)],
            setsigdef=reset_signals,
            setsid=True,
        )
    except OSError as e:
        raise SpawnError(f"cannot run {argv[0]}: {e.strerror or e}") from e
    _ExitWatcher(reactor, pid, on_exit)
    return pid


class SpawnThreads:
    """
    Runs ``spawn(argv, env, stdin)`` calls in threads of its own, each
    answered in the reactor: a queue and a wake-up per call, lighter than a
    thread pool's dispatch. Each spawn waits until its child has executed
    its program, longer on a loaded machine, so a few threads share the
    queue.

    :param reactor: where results are delivered (``callFromThread``).
    :param spawn: starts a program and returns its pid; called in a thread.
    :param threads: how many threads (started at the first call).
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        spawn: Callable[[Sequence[str], Sequence[bytes], int | None], int],
        threads: int,
    ) -> None:
        self.reactor = reactor
        self.spawn = spawn
        self.size = threads
        #: (result, argv, env, stdin) of each spawn asked for; ``None`` ends a thread
        self._jobs: SimpleQueue[tuple[Deferred[int], Sequence[str], Sequence[bytes], int | None] | None] = (
            SimpleQueue()
        )
        self._threads: list[threading.Thread] = []

    def __call__(self, argv: Sequence[str], env: Sequence[bytes], stdin: int | None) -> Deferred[int]:
        """Spawn in a thread; fires in the reactor with the pid, or fails with the error."""
        if not self._threads:
            for n in range(self.size):
                thread = threading.Thread(target=self._run, name=f"kapow-spawn-{n}", daemon=True)
                thread.start()
                self._threads.append(thread)
        result: Deferred[int] = Deferred()
        self._jobs.put((result, argv, env, stdin))
        return result

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            result, argv, env, stdin = job
            try:
                pid = self.spawn(argv, env, stdin)
            except BaseException:
                self.reactor.callFromThread(result.errback, Failure())
            else:
                self.reactor.callFromThread(result.callback, pid)

    def stop(self) -> None:
        """End the threads once the spawns asked for are done."""
        threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join()


def _spawn_failed(argv: Sequence[str], failure: Failure) -> Failure:
    """A failed spawn as :class:`SpawnError`, as :func:`spawn_watched` raises it."""
    error = failure.value
    if isinstance(error, OSError):
        return Failure(SpawnError(f"cannot run {argv[0]}: {error.strerror or error}"))
    return failure


def signal_group(pgid: int, sig: int) -> bool:
    """
    Send ``sig`` to process group ``pgid``.

    :return: ``False`` if the group no longer exists.
    """
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warn("not allowed to signal process group {pgid}", pgid=pgid)
        return False
    return True


class LineLogger(ProcessProtocol):
    """
    Log a child's stdout and stderr line by line.

    :param name: the prefix of every logged line.
    :param logger: the logger to use.
    """

    def __init__(self, name: str, logger: Logger) -> None:
        self.name = name
        self.log = logger
        self._partial: dict[int, bytes] = {}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.pop(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._emit(childFD, line)

    def childConnectionLost(self, childFD: int) -> None:
        rest = self._partial.pop(childFD, b"")
        if rest:
            self._emit(childFD, rest)

    def _emit(self, childFD: int, line: bytes) -> None:
        self.log.info(
            "{name}{stream}: {line}",
            name=self.name,
            stream=" (stderr)" if childFD == 2 else "",
            line=line.rstrip(b"\r").decode("utf-8", "replace"),
        )


def exit_description(reason: Failure) -> tuple[int | None, int | None]:
    """(exit status, signal) of a process from ``processExited``'s reason."""
    return getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None)


ExitCallback = Callable[[int | None, int | None], None]


class HandlerProcess(LineLogger):
    """
    The protocol of one handler process: logs its output when asked to and
    reports its exit (not the end of its pipes, which background children may
    hold open).

    :param on_exit: called with (exit status, signal) when the process exits.
    """

    def __init__(self, name: str, logger: Logger, on_exit: ExitCallback) -> None:
        super().__init__(name, logger)
        self.on_exit = on_exit
        self._held: tuple[int | None, int | None] | None = None
        self._holding = True

    def processExited(self, reason: Failure) -> None:
        how = exit_description(reason)
        if self._holding:
            # reaped while still being started: report once start() returned
            self._held = how
        else:
            self.on_exit(*how)

    def release(self, reactor: IReactorTime) -> None:
        """Report exits from now on (one that already happened, soon)."""
        self._holding = False
        if self._held is not None:
            reactor.callLater(0, self.on_exit, *self._held)


class Spawner:
    """
    Starts handler processes with the handler environment.

    :param reactor: a POSIX reactor: handlers' pipes and exits are watched
        as its readers (``IReactorFDSet``), a spawn in a thread is answered
        through it (``IReactorFromThreads``) and an early exit reported
        through its clock (``IReactorTime``).
    :param environ: returns the server's environment, given to every
        handler; called once, at the first spawn.
    :param urls: returns ``(data URL, control URL)``; called once, at the
        first spawn (the listeners are up by then).
    :param debug: log the handlers' stdout and stderr instead of discarding them.
    :param limited: runs programs under resource limits; ``None`` if this
        system has no way to (then a handler with limits cannot start).
    :param default_limits: the server's limits, for every handler; a
        route's own value of a limit wins.
    :param threads: how many threads may wait in spawns while other
        handlers live (:meth:`_spawn_libc`); 0 to spawn from the reactor's
        thread always, as a worker of ``--workers`` does: there the other
        workers serve while one waits, and a thread's hand-offs cost about
        a third of a spawning request's CPU time.
    """

    #: Never given to handlers, even if the server's environment has them.
    PRIVATE = ("KAPOW_CONTROL_SERVER_CERT", "KAPOW_CONTROL_CLIENT_CERT", "KAPOW_CONTROL_CLIENT_KEY")

    def __init__(
        self,
        reactor: IReactorFDSet,
        environ: Callable[[], Mapping[str, str]],
        urls: Callable[[], tuple[str, str]],
        debug: bool = False,
        limited: LimitedCommand | None = None,
        default_limits: Mapping[str, int] | None = None,
        threads: int = SPAWN_THREADS,
    ) -> None:
        self.reactor = reactor
        self.threads = threads
        self.limited = limited
        self.default_limits = dict(default_limits or {})
        self._environ = environ
        self._base: dict[str, str] | None = None
        self._entries: list[bytes] | None = None
        self.urls = urls
        self.debug = debug
        self._devnull: int | None = None
        self._reset_signals: tuple[int, ...] = ()
        self._watch = False
        self._libc: Spawn | None = None
        self._spawn_threads: SpawnThreads | None = None
        self._live = 0  # handlers spawned through _libc that have not exited
        self._spawning = 0  # spawns waiting in a thread

    def handler_environ(self, handler_id: str) -> dict[str, str]:
        """The environment of the handler ``handler_id``."""
        env = self._base_environ().copy()
        env["KAPOW_HANDLER_ID"] = handler_id
        return env

    def _handler_entries(self, handler_id: str) -> list[bytes]:
        """:meth:`handler_environ` as ``NAME=value`` entries, the common ones encoded once."""
        if self._entries is None:
            self._entries = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in self._base_environ().items()]
        return [*self._entries, b"KAPOW_HANDLER_ID=" + handler_id.encode()]

    def _base_environ(self) -> dict[str, str]:
        if self._base is None:
            data_url, control_url = self.urls()
            self._base = {k: v for k, v in self._environ().items() if k not in self.PRIVATE}
            self._base["KAPOW_DATA_URL"] = data_url
            self._base["KAPOW_CONTROL_URL"] = control_url
        return self._base

    def start(
        self,
        handler_id: str,
        argv: Sequence[str],
        on_exit: ExitCallback,
        stdin: int | None = None,
        limits: Mapping[str, int] | None = None,
    ) -> Deferred[int]:
        """
        Start ``argv`` for handler ``handler_id`` in a session of its own.
        ``on_exit`` is never called before the result fires.

        :param stdin: a descriptor for the handler's stdin (the caller keeps
            it, and closes it once the result fired); ``/dev/null`` by default.
        :param limits: its resource limits (over the server's defaults).

        :return: fires with the process group id (the process's pid), or
            fails with :class:`SpawnError` if it cannot be started. Without
            ``--debug`` the spawn may wait in a thread (:class:`SpawnThreads`,
            see :meth:`_spawn_libc`), so the reactor goes on meanwhile.
        """
        if self._devnull is None:
            self._prepare()
        devnull = self._devnull
        assert devnull is not None  # prepared
        if limits or self.default_limits:
            try:
                argv = self._limited(argv, {**self.default_limits, **(limits or {})})
            except SpawnError:
                return fail()
        if self._libc is not None:
            return self._spawn_libc(argv, self._handler_entries(handler_id), on_exit, stdin)
        env = self.handler_environ(handler_id)
        try:
            if self._watch:
                return succeed(
                    spawn_watched(self.reactor, argv, env, devnull, self._reset_signals, on_exit, stdin)
                )
            out: int | str = "r" if self.debug else devnull
            protocol = HandlerProcess(handler_id, log, on_exit)
            process = spawn_in_session(
                self.reactor,
                protocol,
                argv,
                env,
                {0: devnull if stdin is None else stdin, 1: out, 2: out},
                self._reset_signals,
            )
        except SpawnError:
            return fail()
        protocol.release(cast(IReactorTime, self.reactor))  # a POSIX reactor has a clock
        return succeed(process.pgid)

    def _spawn_libc(
        self, argv: Sequence[str], env: Sequence[bytes], on_exit: ExitCallback, stdin: int | None
    ) -> Deferred[int]:
        """
        Spawn through :mod:`kapow.handlers.libc_spawn`: in a thread while other
        handlers of this spawner live (their requests are served meanwhile),
        else at once, which spares the two thread switches when nothing
        else would run.
        """
        if not argv or not argv[0]:
            return fail(SpawnError("empty entrypoint"))
        libc = self._libc
        assert libc is not None  # prepared, on a system where it works

        def exited(status: int | None, sig: int | None) -> None:
            self._live -= 1
            on_exit(status, sig)

        def watch(pid: int) -> int:
            self._live += 1
            return _ExitWatcher(self.reactor, pid, exited).pid

        if self.threads and (self._live or self._spawning):
            if self._spawn_threads is None:
                # a POSIX reactor has threads to answer from
                self._spawn_threads = SpawnThreads(
                    cast(IReactorFromThreads, self.reactor), libc, self.threads
                )
            self._spawning += 1
            spawned = self._spawn_threads(argv, env, stdin)

            def done(result: _T) -> _T:
                self._spawning -= 1
                return result

            return spawned.addBoth(done).addCallbacks(watch, lambda failure: _spawn_failed(argv, failure))
        try:
            pid = libc(argv, env, stdin)
        except OSError:
            return fail(_spawn_failed(argv, Failure()))
        return succeed(watch(pid))

    def _prepare(self) -> None:
        """What every spawn needs, found once, at the first."""
        close_on_exec_from(3)
        self._reset_signals = ignored_signals()
        self._watch = not self.debug and pidfds_work()
        self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        if self._watch:
            try:
                self._libc = Spawn(self._devnull, self._reset_signals)
            except (OSError, AttributeError) as e:  # AttributeError: a C library without posix_spawn
                log.info("handlers are spawned from the reactor's thread: {why}", why=str(e))

    def _limited(self, argv: Sequence[str], limits: Mapping[str, int]) -> list[str]:
        if not argv or not argv[0]:
            raise SpawnError("empty entrypoint")
        if self.limited is None:
            raise SpawnError("resource limits need the native kapow client or prlimit(1); neither is here")
        # found on the server's PATH, as posix_spawnp finds a program without limits
        program = shutil.which(argv[0], path=os.environ.get("PATH", os.defpath))
        if program is None:
            raise SpawnError(f"cannot run {argv[0]}: no such executable")
        return self.limited.argv(limits, program, argv)

    def close(self) -> None:
        """End the spawning threads and release the descriptor kept for ``/dev/null``."""
        if self._spawn_threads is not None:
            self._spawn_threads.stop()
            self._spawn_threads = None
        if self._libc is not None:
            self._libc.close()
            self._libc = None
        if self._devnull is not None:
            os.close(self._devnull)
            self._devnull = None
