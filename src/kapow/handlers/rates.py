# -*- test-case-name: tests.unit.test_traffic,tests.e2e.test_traffic -*-
"""
The rate limits of routes (SPEC.md §13, route field ``rate``), decided in one
process: the whole server, or the main process of ``--workers``, which its
workers ask (:class:`kapow.server.workers.worker.MainRates`), so that a limit
is exact across them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from kapow.core.routes import Route
from kapow.core.traffic import RateLimiter

__all__ = ["RateLimits", "Rates"]


class RateLimits(Protocol):
    """Decides whether a request of a rated route may go on."""

    def take(
        self, route_id: str, rate: Mapping[str, object], key: str
    ) -> float | Deferred[float | None] | None:
        """
        Take a token of route ``route_id``'s ``rate`` for ``key`` (the
        client's address, or ``""`` for the whole route).

        :return: ``None`` if it was taken, else the seconds until the next
            token (or a Deferred of either).
        """


class Rates:
    """
    The token buckets of every rated route, a :class:`RateLimiter` per
    route id, made anew when the route's ``rate`` changes. The buckets of
    routes no longer in the table are dropped whenever another route's are
    made.

    :param clock: the reactor's time.
    :param routes: the route table.
    """

    def __init__(self, clock: IReactorTime, routes: Iterable[Route]) -> None:
        self.clock = clock
        self.routes = routes
        self._limiters: dict[str, tuple[str, RateLimiter]] = {}

    def take(self, route_id: str, rate: Mapping[str, object], key: str) -> float | None:
        spec = json.dumps(rate, sort_keys=True)
        held = self._limiters.get(route_id)
        if held is None or held[0] != spec:
            live = {route.id for route in self.routes}
            for gone in [known for known in self._limiters if known not in live]:
                del self._limiters[gone]
            held = self._limiters[route_id] = (spec, RateLimiter.from_spec(rate))
        return held[1].take(key, self.clock.seconds())
