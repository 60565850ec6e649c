"""
Running the operator's init programs once the listeners are up.

Each program is executed directly (no shell), all of them concurrently; every
line they print goes to the server log prefixed with the program's name, and
their exit status is logged. A program that is missing or cannot be run is
logged too; it never stops the server.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorCore, IReactorProcess
from twisted.logger import Logger
from twisted.python.failure import Failure

from kapow.spawn import LineLogger, exit_description

log = Logger()


class _InitProgram(LineLogger):
    def processEnded(self, reason: Failure) -> None:
        status, signal = exit_description(reason)
        if signal is not None:
            self.log.warn("{name} killed by signal {signal}", name=self.name, signal=signal)
        elif status:
            self.log.warn("{name} exited with status {status}", name=self.name, status=status)
        else:
            self.log.info("{name} exited with status 0", name=self.name)


class InitProgramsService(Service):
    """
    Runs each init program once, when the reactor is running.

    :param reactor: provides process spawning and ``callWhenRunning``.
    :param programs: paths of the executables to run, in order.
    :param environ: returns the environment for the programs; called at run
        time, once the listeners know their real addresses.
    """

    name = "init-programs"

    def __init__(
        self,
        reactor: IReactorProcess,
        programs: Sequence[str],
        environ: Callable[[], Mapping[str, str]],
    ) -> None:
        self.reactor = reactor
        self.programs = list(programs)
        self.environ = environ

    def startService(self) -> None:
        super().startService()
        if self.programs:
            reactor: IReactorCore = self.reactor  # type: ignore[assignment]
            reactor.callWhenRunning(self.run_all)

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
            log.error("init program {name} is not executable", name=program)
            return
        try:
            process = self.reactor.spawnProcess(_InitProgram(program, log), program, [program], env=dict(env))
        except OSError as e:
            log.error("init program {name} cannot be run: {why}", name=program, why=e)
            return
        log.info("init program {name} started (pid {pid})", name=program, pid=process.pid)
