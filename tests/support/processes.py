"""
What tests of real child processes on the real reactor share: a protocol that
keeps what it was told, whether a process still runs, this process's open
descriptors, and a reactor that runs its main loop.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.process import ProcessReader, ProcessWriter
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from kapow.handlers.fast_processes import SpawnedProcess


class Collector(ProcessProtocol):
    """
    Keeps a child's output and reports its start, its exit and its end
    separately, each as the first of its kind was told.
    """

    def __init__(self) -> None:
        self.output: dict[int, bytes] = {1: b"", 2: b""}
        self.connected_pid: int | None = None
        self.connections = 0
        self.started: Deferred[int] = Deferred()
        self.exited: Deferred[Any] = Deferred()
        self.ended: Deferred[Any] = Deferred()
        self.lost: list[int] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.connections += 1
        self.connected_pid = self.transport.pid
        self.started.callback(self.transport.pid)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output[childFD] = self.output.get(childFD, b"") + data

    def childConnectionLost(self, childFD: int) -> None:
        self.lost.append(childFD)

    def processExited(self, reason: Failure) -> None:
        self.exited.callback(reason.value)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value)


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie nobody reaps does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def open_fds() -> set[int]:
    """This process's open descriptors."""
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def reactor_running() -> Deferred[None]:
    """
    Fires once the reactor runs its main loop, with its SIGCHLD handler.
    Tests spawn from there: a test that ends while the reactor is still
    starting (a child reaped by the start-up reap) leaves trial's next
    reactor run without that handler, and children are never reaped.
    """

    def check(_: object) -> None:
        if signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL:
            raise AssertionError("the reactor runs without its SIGCHLD handler")

    return deferLater(reactor, 0, lambda: None).addCallback(check)


async def until(condition: Callable[[], Any], seconds: float = 5, what: str = "condition") -> None:
    """Let the reactor run until ``condition()`` is true; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


async def children_gone(seconds: float = 5) -> None:
    """
    Let the reactor run until it watches no child process's pipes or exit
    any more: a test that awaited only an exit leaves them for a moment.
    """

    def watched() -> list[object]:
        kinds = (ProcessReader, ProcessWriter, SpawnedProcess)
        return [s for s in [*reactor.getReaders(), *reactor.getWriters()] if isinstance(s, kinds)]

    await until(lambda: not watched(), seconds, what="the children's pipes and exits")
