"""
Handlers never outlive the server, however it ends.

At start the server puts itself into a cgroup of its own (``kapow-<pid>``,
below the cgroup it was started in) when the cgroup v2 hierarchy lets it —
as root, or where a service manager delegated a subtree. Every process it
starts from then on (workers, handlers, init programs, and whatever they
start) is born in that cgroup and cannot leave it. A reaper
(:mod:`kapow.handlers.reaper`) started just before, outside that cgroup, holds the
read end of a pipe whose write end only the server holds: when the server
is gone, even by SIGKILL, the reaper kills the whole cgroup and removes it.
This costs nothing per handler: membership is inherited at the kernel's
fork, with no call of ours.

Where no cgroup can be made, the reaper instead kills every process whose
environment says a handler or an init program of this server started it
(see :func:`kapow.handlers.reaper.marked_processes`): only a program that starts
another with a cleared environment escapes that.

With ``--workers``, each worker gets a cgroup of its own below the server's,
so that the handlers a dead worker left, its children's children included,
can be ended too (:meth:`Containment.end_worker`).
"""

from __future__ import annotations

import os
import sys
from typing import cast

from twisted.application.service import Service
from twisted.internet.interfaces import IProcessTransport, IReactorFDSet, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from kapow.handlers import reaper

log = Logger()

#: Where ``/proc/self/cgroup`` names the cgroup v2 hierarchy.
_V2 = "0::"


def cgroup_v2_dir() -> str | None:
    """The directory of this process's cgroup in the cgroup v2 hierarchy, if mounted."""
    try:
        with open("/proc/self/cgroup") as f:
            relative = next((line[len(_V2) :].strip() for line in f if line.startswith(_V2)), None)
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    if relative is None:
        return None
    for fields in mounts:
        separator = fields.index("-")
        if fields[separator + 1] == "cgroup2":
            return os.path.join(fields[4], relative.lstrip("/"))
    return None


def enter_cgroup(path: str, pid: int) -> None:
    """Move process ``pid`` into the cgroup ``path``; OSError if it cannot be."""
    fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)  # never created: a cgroup has it
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)


def make_cgroup(parent: str, name: str, pid: int) -> str:
    """A new cgroup ``name`` below ``parent``, with ``pid`` moved into it; OSError if not."""
    path = os.path.join(parent, name)
    os.mkdir(path)
    try:
        enter_cgroup(path, pid)
    except OSError:
        os.rmdir(path)
        raise
    return path


class _Reaper(ProcessProtocol):
    def __init__(self, containment: Containment) -> None:
        self.containment = containment

    def processEnded(self, reason: Failure) -> None:
        self.containment.reaper_ended(self)


class Containment(Service):
    """
    Puts the server into a cgroup of its own if it can and starts the
    reaper that ends whatever is left of it when the server is gone.

    :param reactor: a POSIX reactor: times the removal of a worker's cgroup.
    :param processes: spawns the reaper (the server's own processes).
    :param parent: the cgroup below which to make the server's; the one this
        process is in by default.
    :ivar group: the server's cgroup directory, or ``None`` (environment mode).
    """

    name = "containment"

    def __init__(self, reactor: IReactorFDSet, processes: IReactorProcess, parent: str | None = None) -> None:
        self.reactor = reactor
        self.processes = processes
        self.base = parent
        self.group: str | None = None
        self.outside: str | None = None
        self._reaper: IProcessTransport | None = None
        self._pipe: int | None = None
        self._urls: list[str] = []
        self._workers: dict[int, str] = {}

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._contain()

    def startService(self) -> None:
        super().startService()
        self._contain()

    def _contain(self) -> None:
        # first of all services: whatever they start must be born inside
        if self._reaper is not None:
            return
        self.outside = self.base if self.base is not None else cgroup_v2_dir()
        why = "no cgroup v2 hierarchy"
        if self.outside is not None:
            try:
                self.group = make_cgroup(self.outside, f"kapow-{os.getpid()}", os.getpid())
            except OSError as e:
                why = f"cannot make a cgroup in {self.outside}: {e.strerror}"
        self._start_reaper()
        if self.group is not None:
            log.info("handlers are contained in the cgroup {path}", path=self.group)
        else:
            log.info("{why}: handlers left by the server are found by their environment", why=why)

    def _start_reaper(self) -> None:
        protocol = _Reaper(self)
        read, self._pipe = os.pipe()  # both close-on-exec: the reaper gets only its copy of the read end
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            # as for handlers, it gets 0, 1 and 2 only, and a process group of its own:
            # what kills the server's process group (kill -9 -PGID, a
            # terminal's signals) does not reach it
            self._reaper = self.processes.spawnProcess(
                protocol,
                sys.executable,
                [sys.executable, "-m", "kapow.handlers.reaper", self.group or "-", str(os.getpid())],
                os.environ,
                childFDs={0: read, 1: devnull, 2: 2},
            )
        finally:
            os.close(devnull)
            os.close(read)
        pid = self._reaper.pid  # not reaped yet: the reactor has not looked
        if self.group is not None and self.outside is not None and pid is not None:
            try:  # born inside, like everything started from here: it must not kill itself
                enter_cgroup(self.outside, pid)
            except OSError as e:
                log.warn("the reaper could not leave {path}: {why}", path=self.group, why=e.strerror)
        for url in self._urls:
            self._tell(f"url {url}")

    def _tell(self, line: str) -> None:
        if self._pipe is not None:
            try:
                os.write(self._pipe, line.encode() + b"\n")
            except OSError:
                pass  # the reaper is gone: another one gets told everything

    def failing(self) -> None:
        """The server ends before it served: the reaper cleans up without a word."""
        self._tell("quiet")

    def reaper_ended(self, protocol: _Reaper) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        if self.running:
            log.warn("the reaper ended: starting another")
            self._start_reaper()

    def watch(self, data_url: str) -> None:
        """
        Processes with ``data_url`` as their ``KAPOW_DATA_URL`` are this
        server's (used where there is no cgroup).
        """
        self._urls.append(data_url)
        self._tell(f"url {data_url}")

    def enter_worker(self, number: int, pid: int) -> None:
        """Move the new worker ``pid`` into a cgroup of its own, if the server has one."""
        if self.group is None:
            return
        try:
            self._workers[pid] = make_cgroup(self.group, f"worker-{number}-{pid}", pid)
        except OSError as e:
            log.warn("worker {n}: no cgroup of its own: {why}", n=number, why=e.strerror)

    def end_worker(self, pid: int) -> int:
        """
        Kill whatever the worker ``pid`` left in its cgroup and remove it.

        :return: how many processes were left.
        """
        path = self._workers.pop(pid, None)
        if path is None:
            return 0
        count = reaper.kill_cgroup(path)
        self._remove(path, 100)
        return count

    def _remove(self, path: str, tries: int) -> None:
        # a killed process leaves its cgroup only once it is fully gone
        if not reaper.remove_cgroup(path, wait=0) and tries > 0:
            cast(IReactorTime, self.reactor).callLater(0.05, self._remove, path, tries - 1)  # it has a clock

    def stopService(self) -> None:
        # the reaper stays: it ends whatever is left once this process is gone
        super().stopService()
