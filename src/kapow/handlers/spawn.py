# -*- test-case-name: tests.unit.test_spawner,tests.e2e.test_spawn -*-
"""
Starting handlers' processes, and ending whole process groups.

Each handler's process is a :class:`HandlerProtocol` bound to its handler
id: the one place that learns of the child's start, output, exit and end,
and tells the handler's owner. :class:`Spawner` builds it, with the handler's
environment, and starts it with ``processes.spawnProcess(...)``, where
``processes`` provides :class:`~twisted.internet.interfaces.IReactorProcess`:
:class:`~kapow.handlers.fast_processes.FastProcesses` where this system has
what it needs, else :class:`~kapow.handlers.processes.ReactorProcesses`
(:func:`handler_processes`). Either starts every handler as the leader of a
process group of its own, so that :func:`signal_group` ends whatever it started.

A handler's output is discarded (its stdout and stderr are ``/dev/null``),
or, with ``--debug``, read through pipes and logged line by line under its
handler id. Its response completes when it exits, even if a background
child still holds those pipes (``processExited``, not ``processEnded``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, cast

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IProcessTransport, IReactorFDSet, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from kapow.core.resource_limits import LimitedCommand
from kapow.handlers.fast_processes import SPAWN_THREADS, FastProcesses
from kapow.handlers.processes import Environ, ReactorProcesses

__all__ = [
    "SPAWN_KINDS",
    "ExitCallback",
    "HandlerProtocol",
    "LineLogger",
    "ProcessStream",
    "SpawnError",
    "Spawner",
    "exit_description",
    "handler_processes",
    "signal_group",
]

log = Logger()

#: Bytes of a job's stderr kept, its last ones (SPEC.md §12).
STDERR_TAIL = 4096

#: The providers ``--spawn`` names: :class:`FastProcesses`, :class:`ReactorProcesses`.
SPAWN_KINDS = ("fast", "reactor")


class SpawnError(Exception):
    """The program could not be started; ``str()`` says why, in one line."""


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


def handler_processes(
    reactor: IReactorFDSet, kind: str | None = None, threads: int = SPAWN_THREADS
) -> IReactorProcess:
    """
    The provider of handlers' processes that ``kind`` names
    (:data:`SPAWN_KINDS`); by default the fast one where this system has
    it, else the reactor's.

    :param threads: of :class:`FastProcesses`.
    :raises ValueError: for ``"fast"`` where this system cannot have it.
    """
    if kind == "reactor":
        return ReactorProcesses(reactor)
    why = FastProcesses.unavailable()
    if why is None:
        return FastProcesses(reactor, threads)
    if kind == "fast":
        raise ValueError(f"--spawn fast: not on this system: {why}")
    log.info("handlers are spawned from the reactor's thread: {why}", why=why)
    return ReactorProcesses(reactor)


class LineLogger(ProcessProtocol):
    """
    Log a child's stdout and stderr line by line.

    :param name: the prefix of every logged line.
    :param logger: the logger to use.
    """

    #: whether what it reads is logged
    logs = True

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

    def level(self, childFD: int) -> LogLevel:
        """The level at which the lines of ``childFD`` are logged."""
        return LogLevel.info

    def _emit(self, childFD: int, line: bytes) -> None:
        self.log.emit(
            self.level(childFD),
            "{name}{stream}: {line}",
            name=self.name,
            stream=" (stderr)" if childFD == 2 else "",
            line=line.rstrip(b"\r").decode("utf-8", "replace"),
        )


def exit_description(reason: Failure) -> tuple[int | None, int | None]:
    """(exit status, signal) of a process from ``processExited``'s reason."""
    return getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None)


#: Told a process's exit: its status, or the signal that killed it.
ExitCallback = Callable[[int | None, int | None], None]


class HandlerProtocol(LineLogger):
    """
    The process of one handler, bound to its handler id: the one place that
    learns of the child's start, output, exit and end, and tells the
    handler's owner.

    - start (``makeConnection``): :attr:`started` fires with the transport's
      pid, which is the process group; if the child never ran, it fails with
      the reason its provider ended the protocol with.
    - output (``childDataReceived``, where its stdout and stderr are pipes):
      logged line by line, each line prefixed with the handler id.
    - exit (``processExited``): ``on_exit(exit status, signal)``, never before
      the owner's callbacks on :attr:`started` ran (see :meth:`release`).
    - end (``processEnded``: it exited and its pipes are closed, which
      background children may delay): nothing more to tell.

    :param handler_id: the handler's id.
    :param on_exit: called with (exit status, signal) when the process exits.
    :param logger: logs its output.
    """

    #: where the last :data:`STDERR_TAIL` bytes of its stderr are kept, if they are
    stderr_tail: bytearray | None = None

    def __init__(self, handler_id: str, on_exit: ExitCallback, logger: Logger) -> None:
        super().__init__(handler_id, logger)
        self.on_exit = on_exit
        self.started: Deferred[int] = Deferred()
        self._holding = True
        self._held: tuple[int | None, int | None] | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None  # connected
        self.started.callback(self.transport.pid)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        tail = self.stderr_tail
        if childFD == 2 and tail is not None:
            tail += data
            del tail[:-STDERR_TAIL]
            if not self.logs:
                return
        super().childDataReceived(childFD, data)

    def processExited(self, reason: Failure) -> None:
        how = exit_description(reason)
        if self._holding:  # exited while its start was still being answered
            self._held = how
        else:
            self.on_exit(*how)

    def processEnded(self, reason: Failure) -> None:
        if not self.started.called:  # ended without ever running
            self.started.errback(reason)

    def release(self, clock: IReactorTime) -> Deferred[int]:
        """
        Report the exit from now on (one that already came, in the clock's
        next turn, once the owner has had :attr:`started`, which this returns).
        """
        self._holding = False
        if self._held is not None:
            clock.callLater(0, self.on_exit, *self._held)
        return self.started


class ProcessStream(Protocol):
    """
    A connection that a handler's process talks to through pipes (a
    WebSocket or event-stream route's): its stdout, and its stdin if it
    :attr:`wants_stdin`.
    """

    #: whether the process's stdin is a pipe from it (else ``/dev/null``)
    wants_stdin: bool

    def process_started(self, process: IProcessTransport) -> None:
        """The process runs: ``process`` takes its stdin, and pauses its stdout."""

    def output(self, data: bytes) -> None:
        """The process wrote ``data`` to its stdout."""

    def output_ended(self) -> None:
        """Its stdout closed (every process holding it exited or closed it)."""


class StreamProtocol(HandlerProtocol):
    """A :class:`HandlerProtocol` whose stdout (and stdin) belong to a :class:`ProcessStream`."""

    def __init__(self, handler_id: str, on_exit: ExitCallback, logger: Logger, stream: ProcessStream) -> None:
        super().__init__(handler_id, on_exit, logger)
        self.stream = stream

    def connectionMade(self) -> None:
        super().connectionMade()
        assert self.transport is not None  # connected
        self.stream.process_started(self.transport)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self.stream.output(data)
        else:
            super().childDataReceived(childFD, data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 1:
            self.stream.output_ended()
        else:
            super().childConnectionLost(childFD)


def _start_failed(failure: Failure, program: str) -> Failure:
    """A failure to start ``program`` as :class:`SpawnError`."""
    error = failure.value
    if isinstance(error, OSError):
        return Failure(SpawnError(f"cannot run {program}: {error.strerror or error}"))
    return failure


class Spawner:
    """
    Starts handler processes with the handler environment.

    :param reactor: a POSIX reactor; its clock reports an exit that came
        while a start was still being answered (``IReactorTime``).
    :param environ: returns the server's environment, given to every
        handler; called once, at the first spawn.
    :param urls: returns ``(data URL, control URL)``; called once, at the
        first spawn (the listeners are up by then).
    :param processes: starts the processes; :func:`handler_processes` of the
        reactor by default.
    :param debug: log the handlers' stdout and stderr instead of discarding them.
    :param limited: runs programs under resource limits; ``None`` if this
        system has no way to (then a handler with limits cannot start).
    :param default_limits: the server's limits, for every handler; a
        route's own value of a limit wins.
    """

    #: Never given to handlers, even if the server's environment has them.
    PRIVATE = ("KAPOW_CONTROL_SERVER_CERT", "KAPOW_CONTROL_CLIENT_CERT", "KAPOW_CONTROL_CLIENT_KEY")

    def __init__(
        self,
        reactor: IReactorFDSet,
        environ: Callable[[], Mapping[str, str]],
        urls: Callable[[], tuple[str, str]],
        *,
        processes: IReactorProcess | None = None,
        debug: bool = False,
        limited: LimitedCommand | None = None,
        default_limits: Mapping[str, int] | None = None,
    ) -> None:
        self.reactor = reactor
        self.processes = handler_processes(reactor) if processes is None else processes
        self.limited = limited
        self.default_limits = dict(default_limits or {})
        self._environ = environ
        self._base: Environ | None = None
        self.urls = urls
        self.debug = debug
        self._devnull: int | None = None

    @property
    def threads(self) -> int:
        """How many threads spawns may wait in (0: each spawn is in the reactor's thread)."""
        return self.processes.threads if isinstance(self.processes, FastProcesses) else 0

    def handler_environ(self, handler_id: str) -> Environ:
        """The environment of the handler ``handler_id``."""
        return self._base_environ().adding("KAPOW_HANDLER_ID", handler_id)

    def _base_environ(self) -> Environ:
        if self._base is None:
            data_url, control_url = self.urls()
            base = {k: v for k, v in self._environ().items() if k not in self.PRIVATE}
            base["KAPOW_DATA_URL"] = data_url
            base["KAPOW_CONTROL_URL"] = control_url
            self._base = Environ(base)
        return self._base

    def start(
        self,
        handler_id: str,
        argv: Sequence[str],
        on_exit: ExitCallback,
        stdin: int | None = None,
        limits: Mapping[str, int] | None = None,
        stream: ProcessStream | None = None,
        stderr_tail: bytearray | None = None,
    ) -> Deferred[int]:
        """
        Start ``argv`` for handler ``handler_id`` in a process group of its own.
        ``on_exit`` is never called before the result fires.

        :param stdin: a descriptor for the handler's stdin (the caller keeps
            it, and closes it once the result fired); ``/dev/null`` by default.
        :param limits: its resource limits (over the server's defaults).
        :param stream: what its stdout (and stdin, if it wants it) are
            pipes to, if anything.
        :param stderr_tail: where to keep the last :data:`STDERR_TAIL`
            bytes of its stderr, if anywhere.

        :return: fires with the process group id (the process's pid), or
            fails with :class:`SpawnError` if it cannot be started. The spawn
            may wait in a thread of its provider, so the reactor goes on meanwhile.
        """
        if not argv or not argv[0]:
            return fail(SpawnError("empty entrypoint"))
        if self._devnull is None:
            self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        devnull = self._devnull
        if limits or self.default_limits:
            try:
                argv = self._limited(argv, {**self.default_limits, **(limits or {})})
            except SpawnError:
                return fail()
        out: int | str = "r" if self.debug else devnull
        child_fds: dict[int, int | str] = {0: devnull if stdin is None else stdin, 1: out, 2: out}
        protocol: HandlerProtocol
        if stream is None:
            protocol = HandlerProtocol(handler_id, on_exit, log)
        else:
            protocol = StreamProtocol(handler_id, on_exit, log, stream)
            child_fds[1] = "r"
            if stream.wants_stdin:
                child_fds[0] = "w"
        protocol.logs = self.debug
        if stderr_tail is not None:
            protocol.stderr_tail = stderr_tail
            child_fds[2] = "r"
        try:
            self.processes.spawnProcess(
                protocol, argv[0], argv, self.handler_environ(handler_id), childFDs=child_fds
            )
        except OSError as e:
            return fail(SpawnError(f"cannot run {argv[0]}: {e.strerror or e}"))
        started = protocol.release(cast(IReactorTime, self.reactor))  # a POSIX reactor has a clock
        if protocol.connected:  # it runs already: there is no failure to come
            return started
        return started.addErrback(_start_failed, argv[0])

    def _limited(self, argv: Sequence[str], limits: Mapping[str, int]) -> list[str]:
        if self.limited is None:
            raise SpawnError("resource limits need the native kapow client or prlimit(1); neither is here")
        # found on the server's PATH, as posix_spawnp finds a program without limits
        program = shutil.which(argv[0], path=os.environ.get("PATH", os.defpath))
        if program is None:
            raise SpawnError(f"cannot run {argv[0]}: no such executable")
        return self.limited.argv(limits, program, argv)

    def close(self) -> None:
        """Release the descriptor kept for ``/dev/null``, and its processes' threads."""
        if isinstance(self.processes, FastProcesses):
            self.processes.close()
        if self._devnull is not None:
            os.close(self._devnull)
            self._devnull = None
