"""
Governing handler processes: deadlines, ending whole process groups
(SIGTERM, a grace period, SIGKILL), and draining everything on a graceful
stop. The concurrency limits and their queues are :mod:`kapow.handlers.admission`'s.

Every handler leads a process group of its own (:mod:`kapow.handlers.spawn`), so
ending the group ends whatever the handler started, background children
included.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from kapow.core.routes import Route
from kapow.handlers.procfs import processes
from kapow.handlers.spawn import signal_group

log = Logger()

#: How often group membership is checked while waiting for groups to end.
#: Seconds from SIGTERM to the first look at whether a group is gone.
FIRST_LOOK = 0.01
POLL_INTERVAL = 0.05

_T = TypeVar("_T")


@dataclass(frozen=True)
class Limits:
    """
    Server-wide defaults and caps.

    :param handler_timeout: seconds a handler may run when its route sets
        no ``timeout``; ``None`` for no limit (the reference's behaviour).
    :param kill_grace: seconds between SIGTERM and SIGKILL.
    :param keep_running_on_disconnect: leave handlers running when their
        client hangs up, unless their route says otherwise.
    :param shutdown_timeout: seconds a graceful stop waits for running
        handlers before ending them.
    """

    handler_timeout: float | None = None
    kill_grace: float = 3.0
    keep_running_on_disconnect: bool = False
    shutdown_timeout: float = 30.0


@dataclass
class _Run:
    pgid: int | None  # None while its process is being spawned
    route: Route
    started: float
    timer: IDelayedCall | None = None
    #: ended as soon as its process group is known
    doomed: bool = False


@dataclass
class Governor:
    """
    :param reactor: times the deadlines and the grace periods.
    :param limits: the server's limits.
    :param group_alive: tells whether a process group still has a live
        (non-zombie) member; a :class:`GroupScan` on ``reactor`` by default.
    :param signal_group: sends a signal to a process group, returning
        whether the group exists; :func:`kapow.handlers.spawn.signal_group` by default.
    """

    reactor: IReactorTime
    limits: Limits = field(default_factory=Limits)
    group_alive: Callable[[int], bool] = field(default=None)  # type: ignore[assignment]  # made from the reactor
    signal_group: Callable[[int, int], bool] = field(default=signal_group)
    _runs: dict[str, _Run] = field(default_factory=dict)
    _groups: set[int] = field(default_factory=set)
    _idle: list[Deferred[None]] = field(default_factory=list)
    #: set when a graceful stop begins: no new handler may start
    stopping: bool = False
    #: called once when a graceful stop begins (:meth:`stop_admitting`)
    on_stopping: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.group_alive is None:
            self.group_alive = GroupScan(self.reactor)

    # -- admission ----------------------------------------------------------

    def admit(self, route: Route) -> str | None:
        """
        ``None`` if a handler for ``route`` may start now, else why not:
        only a stopping server refuses here (limits: :mod:`kapow.handlers.admission`).
        """
        if self.stopping:
            return "the server is stopping"
        return None

    def release(self, route: Route) -> None:
        """Nothing to give back: :meth:`exited` already counted the handler out."""

    def stop_admitting(self) -> None:
        """A graceful stop begins: no handler may start from now on."""
        if not self.stopping:
            self.stopping = True
            for call in self.on_stopping:
                call()

    def running(self) -> int:
        """Handler processes that have not exited yet."""
        return len(self._runs)

    # -- one handler's life -------------------------------------------------

    def started(
        self, handler_id: str, route: Route, pgid: int | None, on_timeout: Callable[[float], None]
    ) -> None:
        """
        Track a handler from the start of its process: its slot is taken
        from here on. ``pgid`` is ``None`` while the process is being
        spawned; :meth:`spawned` gives it then.

        :param on_timeout: called with the elapsed seconds if the handler
            outlives its route's timeout (or the server default).
        """
        run = _Run(pgid, route, self.reactor.seconds())
        timeout = route.timeout if route.timeout is not None else self.limits.handler_timeout
        if timeout is not None:
            run.timer = self.reactor.callLater(
                timeout, lambda: on_timeout(self.reactor.seconds() - run.started)
            )
        self._runs[handler_id] = run
        if pgid is not None:
            self._groups.add(pgid)

    def spawned(self, handler_id: str, pgid: int) -> None:
        """The process of a handler :meth:`started` without one is there:
        its group is ``pgid``. A handler ended meanwhile is ended now."""
        run = self._runs.get(handler_id)
        if run is None:
            return
        run.pgid = pgid
        self._groups.add(pgid)
        if run.doomed:
            self.end_groups({pgid})

    def exited(self, handler_id: str) -> float:
        """
        The handler's process exited; return how long it ran, in seconds.
        """
        run = self._runs.pop(handler_id, None)
        if run is None:
            return 0.0
        if run.timer is not None and run.timer.active():
            run.timer.cancel()
        if run.pgid is not None and not self.group_alive(run.pgid):
            self._groups.discard(run.pgid)
        if not self._runs:
            idle, self._idle = self._idle, []
            for d in idle:
                if not d.called:
                    d.callback(None)
        return self.reactor.seconds() - run.started

    def pid(self, handler_id: str) -> int | None:
        """The pid (and process group) of a running handler, if it runs."""
        run = self._runs.get(handler_id)
        return None if run is None else run.pgid

    def started_at(self, handler_id: str) -> float | None:
        """When a running handler's process started (``reactor.seconds()``)."""
        run = self._runs.get(handler_id)
        return None if run is None else run.started

    def keeps_running_on_disconnect(self, route: Route) -> bool:
        """Whether ``route``'s handlers survive their client hanging up."""
        if route.keep_running_on_disconnect is not None:
            return route.keep_running_on_disconnect
        return self.limits.keep_running_on_disconnect

    def terminate(self, handler_id: str) -> Deferred[None]:
        """End the whole process group of a running handler."""
        run = self._runs.get(handler_id)
        if run is None:
            return succeed(None)
        if run.timer is not None and run.timer.active():
            run.timer.cancel()
        if run.pgid is None:
            run.doomed = True
            return succeed(None)
        return self.end_groups({run.pgid})

    # -- ending groups ------------------------------------------------------

    def end_groups(self, pgids: set[int], grace: float | None = None) -> Deferred[None]:
        """
        SIGTERM each group, SIGKILL what is left after the grace period;
        fires once no member of any group is alive.
        """
        grace = self.limits.kill_grace if grace is None else grace
        alive = {pgid for pgid in pgids if self.signal_group(pgid, signal.SIGTERM)}
        done: Deferred[None] = Deferred()
        deadline = self.reactor.seconds() + grace
        killed = False

        def check() -> None:
            nonlocal killed
            alive.intersection_update({pgid for pgid in alive if self.group_alive(pgid)})
            if not alive:
                self._groups.difference_update(pgids)
                done.callback(None)
                return
            if not killed and self.reactor.seconds() >= deadline:
                killed = True
                for pgid in alive:
                    log.info("process group {pgid} outlived the grace period: SIGKILL", pgid=pgid)
                    self.signal_group(pgid, signal.SIGKILL)
            self.reactor.callLater(POLL_INTERVAL, check)

        if alive and grace > 0:
            # a group just sent SIGTERM is seldom gone at once: looked at a moment later, it mostly
            # has no member left, which one system call tells, rather than a scan of /proc
            self.reactor.callLater(FIRST_LOOK, check)
        else:
            check()
        return done

    # -- graceful stop ------------------------------------------------------

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Fires when no handler process is running, or after ``timeout``
        seconds, whichever comes first.
        """
        if not self._runs:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)

        def time_up() -> None:
            if not d.called:
                d.callback(None)

        call = self.reactor.callLater(timeout, time_up)

        def stop_timer(result: _T) -> _T:
            if call.active():
                call.cancel()
            return result

        return d.addBoth(stop_timer)

    def end_all(self, grace: float | None = None) -> Deferred[None]:
        """End every handler group still alive, running or left behind
        (once every process being spawned is there)."""
        if any(run.pgid is None for run in self._runs.values()):
            return deferLater(self.reactor, POLL_INTERVAL).addCallback(lambda _: self.end_all(grace))
        groups = {run.pgid for run in self._runs.values() if run.pgid is not None} | self._groups
        return self.end_groups(groups, grace)


def group_alive(pgid: int, live_groups: Callable[[], set[int]] | None = None) -> bool:
    """
    Whether process group ``pgid`` has a member that is not a zombie
    (zombies are dead; they only wait for their parent to collect them).

    :param live_groups: gives the groups that have such a member now; a
        scan of ``/proc`` by default.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:  # no member at all: one system call says so
        return False
    except PermissionError:
        return True
    try:
        return pgid in (live_groups or _live_groups)()
    except OSError:  # no /proc to read
        return True


def _live_groups() -> set[int]:
    """The process groups with a member that is not a zombie, from ``/proc``."""
    return {pgrp for _pid, state, pgrp in processes() if state != b"Z"}


class GroupScan:
    """
    :func:`group_alive` for many groups at once: a group with no member at
    all is known dead from one system call, and one scan of ``/proc``
    answers for every group asked about within ``fresh`` seconds (ending a
    thousand connections' groups at once takes one scan a poll, not one a
    group).

    :param clock: the reactor's time.
    :param fresh: seconds a scan answers for.
    """

    def __init__(self, clock: IReactorTime, fresh: float = POLL_INTERVAL / 2) -> None:
        self.clock = clock
        self.fresh = fresh
        self._live: set[int] | None = None
        self._at = 0.0

    def __call__(self, pgid: int) -> bool:
        return group_alive(pgid, self._groups)

    def _groups(self) -> set[int]:
        now = self.clock.seconds()
        if self._live is None or now - self._at >= self.fresh:
            self._live, self._at = _live_groups(), now
        return self._live
