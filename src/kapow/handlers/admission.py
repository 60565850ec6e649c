"""
Admission of handlers under the concurrency limits (a route's
``max_concurrency``, the server's ``--max-handlers``) and their queues.

A request that finds its limit reached waits in a queue, when the limit has
one with room, for a free slot, first come first served; when a slot frees,
the earliest waiting request that fits takes it at once, so a request that
arrives later never overtakes one that waits. A waiting request leaves the
queue when it gets a slot, when it waited too long (refused), or when it is
withdrawn (its client left, an operator killed it, the server stops): no
process is ever started for it then.

:class:`Slots` is the bookkeeping, the same in a server of one process and
in the main process of ``--workers N``, which decides for every worker.
What the user interface asks of admission is :class:`Admission`:
:class:`LocalAdmission` in a server of one process, the worker's
``MainAdmission`` (:mod:`kapow.server.workers.worker`) under ``--workers N``,
and a :class:`~kapow.handlers.governor.Governor` alone where no limit applies.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from kapow.core.routes import DEFAULT_QUEUE_TIMEOUT, Route

if TYPE_CHECKING:
    from kapow.handlers.governor import Governor

#: Why a request that waited is refused, by way of its queue.
TIMED_OUT = "waited {timeout:g}s in the queue"


class Admission(Protocol):
    """Decides whether a handler of a route may start, and is told when one has ended."""

    def admit(self, route: Route) -> str | Deferred[str | None] | None:
        """
        Ask to start a handler of ``route``: ``None`` if it may start now; a
        reason if it is refused now; else a Deferred that fires with ``None``
        once it may start or with the reason it was refused. Cancelling that
        Deferred withdraws the request: it never starts then.
        """

    def release(self, route: Route) -> None:
        """A handler that :meth:`admit` let start has exited (or never started)."""


@dataclass(frozen=True)
class ServerQueue:
    """
    The limit of the whole server and its queue.

    :param max_handlers: at most this many handlers at once (``None``: no limit).
    :param queue: how many requests may wait for one of them.
    :param queue_timeout: seconds one may wait.
    """

    max_handlers: int | None = None
    queue: int = 0
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT


@dataclass(frozen=True)
class Want:
    """
    What one request asks for: a slot of route ``key``, under its ``limit``
    (``None``: only the server's), with a queue of ``queue`` waiting at most
    ``queue_timeout`` seconds for the route's limit.
    """

    key: str
    limit: int | None = None
    queue: int = 0
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT

    @classmethod
    def of(cls, route: Route) -> Want:
        """What a request for ``route`` asks for."""
        return cls(
            route.id,
            route.max_concurrency,
            route.queue or 0,
            route.queue_timeout if route.queue_timeout is not None else DEFAULT_QUEUE_TIMEOUT,
        )


@dataclass(eq=False)
class _Waiter:
    want: Want
    #: whose queue it counts in: the route's (``True``) or the server's
    on_route: bool
    answer: Deferred[str | None]
    timer: IDelayedCall | None = None


@dataclass
class Slots:
    """
    The handlers running under a limit, and the requests waiting for one.

    :param clock: times the queue timeouts.
    :param server: the server's limit and queue.
    """

    clock: IReactorTime
    server: ServerQueue = field(default_factory=ServerQueue)
    total: int = 0
    per_route: Counter[str] = field(default_factory=Counter)
    _waiting: deque[_Waiter] = field(default_factory=deque)
    _queued_route: Counter[str] = field(default_factory=Counter)
    _queued_server: int = 0

    def limited(self, want: Want) -> bool:
        """Whether a request for ``want`` is under any limit at all."""
        return want.limit is not None or self.server.max_handlers is not None

    def admit(self, want: Want) -> str | Deferred[str | None] | None:
        """
        Take a slot for ``want``: ``None`` if it got one now; a reason if it
        is refused now; else a Deferred that fires with ``None`` once it got
        one or with the reason it was refused. Cancelling that Deferred
        withdraws the request from its queue.
        """
        route_full = want.limit is not None and self.per_route[want.key] >= want.limit
        server_full = self.server.max_handlers is not None and self.total >= self.server.max_handlers
        if not route_full and not server_full:
            self._take(want)
            return None
        if route_full:
            if self._queued_route[want.key] >= want.queue:
                full = "route limit of {} handlers reached" if not want.queue else "route queue of {} is full"
                return full.format(want.queue or want.limit)
            timeout = want.queue_timeout
        else:
            if self._queued_server >= self.server.queue:
                cap, queue = self.server.max_handlers, self.server.queue
                return (
                    f"server queue of {queue} is full" if queue else f"server limit of {cap} handlers reached"
                )
            timeout = self.server.queue_timeout
        waiter = _Waiter(want, route_full, Deferred(lambda d: self._withdraw(waiter)))
        waiter.timer = self.clock.callLater(timeout, self._timed_out, waiter, timeout)
        self._waiting.append(waiter)
        self._count(waiter, 1)
        return waiter.answer

    def release(self, want: Want) -> None:
        """Give back a slot :meth:`admit` gave, and hand it on to the earliest waiting request that fits."""
        self.total -= 1
        if want.limit is not None:
            self.per_route[want.key] -= 1
            if not self.per_route[want.key]:
                del self.per_route[want.key]
        self._hand_on()

    def waiting(self) -> int:
        """How many requests wait."""
        return len(self._waiting)

    def refuse_waiting(self, reason: str) -> None:
        """Refuse every waiting request with ``reason`` (the server stops)."""
        waiting, self._waiting = list(self._waiting), deque()
        for waiter in waiting:
            self._forget(waiter)
        for waiter in waiting:
            waiter.answer.callback(reason)

    def _take(self, want: Want) -> None:
        self.total += 1
        if want.limit is not None:
            self.per_route[want.key] += 1

    def _fits(self, want: Want) -> bool:
        if self.server.max_handlers is not None and self.total >= self.server.max_handlers:
            return False
        return want.limit is None or self.per_route[want.key] < want.limit

    def _hand_on(self) -> None:
        granted = []
        for waiter in list(self._waiting):
            if self._fits(waiter.want):
                self._take(waiter.want)
                self._waiting.remove(waiter)
                self._forget(waiter)
                granted.append(waiter)
        # answered after the bookkeeping: an answer may release again (its process did not start)
        for waiter in granted:
            waiter.answer.callback(None)

    def _count(self, waiter: _Waiter, step: int) -> None:
        if waiter.on_route:
            self._queued_route[waiter.want.key] += step
            if not self._queued_route[waiter.want.key]:
                del self._queued_route[waiter.want.key]
        else:
            self._queued_server += step

    def _forget(self, waiter: _Waiter) -> None:
        self._count(waiter, -1)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()

    def _timed_out(self, waiter: _Waiter, timeout: float) -> None:
        if waiter in self._waiting:
            self._waiting.remove(waiter)
            self._forget(waiter)
            waiter.answer.callback(TIMED_OUT.format(timeout=timeout))

    def _withdraw(self, waiter: _Waiter) -> None:
        if waiter in self._waiting:
            self._waiting.remove(waiter)
            self._forget(waiter)


class LocalAdmission:
    """
    Admission in a server of one process: nothing starts while the server
    stops; a route under no limit is admitted at once, without bookkeeping.

    :param governor: tells whether the server stops (``stopping``).
    :param slots: the limits and queues.
    """

    def __init__(self, governor: Governor, slots: Slots) -> None:
        self.governor = governor
        self.slots = slots
        self._unlimited = slots.server.max_handlers is None
        governor.on_stopping.append(lambda: slots.refuse_waiting("the server is stopping"))

    def admit(self, route: Route) -> str | Deferred[str | None] | None:
        """As :meth:`Slots.admit`, for a request of ``route``."""
        if self.governor.stopping:
            return "the server is stopping"
        if self._unlimited and route.max_concurrency is None:
            return None
        return self.slots.admit(Want.of(route))

    def release(self, route: Route) -> None:
        """A handler :meth:`admit` let start has exited (or never started)."""
        if self._unlimited and route.max_concurrency is None:
            return
        self.slots.release(Want.of(route))
