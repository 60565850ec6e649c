"""
Running the operator's init programs once the listeners are up
(``INIT_PROGRAM``, docs/reference/cli.rst).

Each program is executed directly (no shell), all of them concurrently; every
line they print on stderr goes to the server log prefixed with the program's
name (on stdout too with ``--debug``), and their exit status is logged. A program that is missing or cannot be run is
logged too, with what to do about it; it never stops the server. Init
programs still running when the server stops get SIGTERM.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReactorCore, IReactorProcess, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from kapow.handlers.spawn import LineLogger, exit_description

log = Logger()

#: Seconds between SIGTERM and SIGKILL for init programs still running at stop.
STOP_GRACE = 3.0


def _signal(program: _InitProgram, name: str) -> None:
    if program.transport is None:
        return  # not started
    try:
        program.transport.signalProcess(name)
    except ProcessExitedAlready:
        pass


def _cannot_run(error: OSError) -> str:
    """Why an init program that exists could not be run, and what to do about it."""
    if error.errno == errno.ENOEXEC:
        return "it needs a #! line, such as #!/bin/sh, as its first line"
    if error.errno == errno.ENOENT:
        return "the interpreter its #! line names is not there"
    return error.strerror or str(error)


def _kill_all(programs: list[_InitProgram]) -> None:
    for program in programs:
        _signal(program, "KILL")


class _InitProgram(LineLogger):
    """
    One init program: what it writes on stderr is logged, what it writes on
    stdout (the routes ``kapow route add`` made, which the control API logs
    already) only with ``debug``, as the reference does.
    """

    def __init__(self, name: str, logger: Logger, debug: bool = False) -> None:
        super().__init__(name, logger)
        self.debug = debug
        self.ended: Deferred[None] = Deferred()
        self.pid: int | None = None

    def level(self, childFD: int) -> LogLevel:
        return LogLevel.info if childFD == 2 or self.debug else LogLevel.debug

    def connectionMade(self) -> None:
        # kept: the transport forgets it once the program is reaped, which
        # may come before its start is logged
        self.pid = getattr(self.transport, "pid", None)

    def processEnded(self, reason: Failure) -> None:
        status, signal = exit_description(reason)
        if signal is not None:
            self.log.warn("{name} killed by signal {signal}", name=self.name, signal=signal)
        elif status:
            self.log.warn("{name} exited with status {status}", name=self.name, status=status)
        else:
            self.log.info("{name} exited with status 0", name=self.name)
        self.ended.callback(None)


class InitProgramsService(Service):
    """
    Runs each init program once, when the reactor is running.

    :param reactor: spawns the programs (unless ``processes`` does); the server's reactor, which also
        provides ``IReactorCore`` (to run them once it runs) and ``IReactorTime``
        (to kill those that outstay the stop).
    :param programs: paths of the executables to run, in order.
    :param environ: returns the environment for the programs; called at run
        time, once the listeners know their real addresses.
    :param processes: spawns the programs instead of ``reactor``.
    :param debug: log what they write on stdout as well as on stderr (``--debug``).
    """

    name = "init-programs"

    def __init__(
        self,
        reactor: IReactorProcess,
        programs: Sequence[str],
        environ: Callable[[], Mapping[str, str]],
        processes: IReactorProcess | None = None,
        debug: bool = False,
    ) -> None:
        self.reactor = reactor
        self.processes = reactor if processes is None else processes
        self.debug = debug
        self.programs = list(programs)
        self.environ = environ
        self._running: set[_InitProgram] = set()

    def startService(self) -> None:
        super().startService()
        if self.programs:
            cast(IReactorCore, self.reactor).callWhenRunning(self.run_all)

    def stopService(self) -> Deferred[Any]:
        """
        Init programs still running when the server stops get SIGTERM, and
        SIGKILL if they are still there :data:`STOP_GRACE` seconds later.
        """
        super().stopService()
        running = list(self._running)
        for program in running:
            log.info("init program {name} still running: SIGTERM", name=program.name)
            _signal(program, "TERM")
        kill = cast(IReactorTime, self.reactor).callLater(STOP_GRACE, _kill_all, running)

        def stopped(_: object) -> None:
            if kill.active():
                kill.cancel()

        return gatherResults([program.ended for program in running]).addBoth(stopped)

    def run_all(self) -> None:
        """Start every init program with the environment of the moment."""
        env = dict(self.environ())
        for program in self.programs:
            self.run(program, env)

    def run(self, program: str, env: Mapping[str, str]) -> None:
        """Start one init program, logging why if it cannot be started."""
        if not os.path.isfile(program):
            log.error("init program {name} not found", name=program)
            return
        if not os.access(program, os.X_OK):
            log.error("init program {name} is not executable: make it so with chmod +x {name}", name=program)
            return
        protocol = _InitProgram(program, log, self.debug)
        try:
            # a path, even without a slash: never looked up in PATH
            self.processes.spawnProcess(protocol, os.path.abspath(program), [program], env=dict(env))
        except OSError as e:
            log.error("init program {name} cannot be run: {why}", name=program, why=_cannot_run(e))
            return
        self._running.add(protocol)
        protocol.ended.addCallback(lambda _: self._running.discard(protocol))
        log.info("init program {name} started (pid {pid})", name=program, pid=protocol.pid)
