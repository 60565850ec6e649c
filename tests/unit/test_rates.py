"""The rate limits as the server decides them: in one process, and a worker's, which asks the main process."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from kapow.core.routes import Route
from kapow.handlers.rates import Rates
from kapow.server.workers.worker import MainRates

RATE = {"requests": 1, "per": 10, "burst": 1, "key": "client"}


def test_a_route_keeps_its_buckets_until_its_rate_changes() -> None:
    clock = Clock()
    rates = Rates(clock, [Route(id="r", method="GET", url_pattern="/r")])
    assert rates.take("r", RATE, "a") is None
    assert rates.take("r", RATE, "a") == 10
    assert rates.take("r", RATE, "b") is None  # a bucket per key
    clock.advance(4)
    assert rates.take("r", RATE, "a") == 6
    assert rates.take("r", {**RATE, "burst": 2}, "a") is None  # a new rate starts afresh


class FakeLink:
    def __init__(self, main: Rates) -> None:
        self.main = main
        self.asked = 0

    def callRemote(self, command: Any, route_id: str, rate: str, key: str) -> Deferred[dict[str, float]]:
        self.asked += 1
        return succeed({"wait": self.main.take(route_id, json.loads(rate), key) or 0.0})


def test_a_worker_refuses_an_empty_bucket_without_asking_again() -> None:
    clock = Clock()
    link = FakeLink(Rates(clock, [Route(id="r", method="GET", url_pattern="/r")]))
    worker = MainRates(link, clock)  # type: ignore[arg-type]

    def take(key: str) -> float | None:
        answer = worker.take("r", RATE, key)
        if isinstance(answer, Deferred):
            found: list[float | None] = []
            answer.addCallback(found.append)
            return found[0]
        return answer

    assert take("a") is None
    assert take("a") == 10
    assert link.asked == 2
    clock.advance(3)
    assert take("a") == 7  # known here: the bucket cannot fill sooner
    assert link.asked == 2
    clock.advance(7)
    assert take("a") is None  # its time has come: asked again
    assert link.asked == 3


def test_the_buckets_of_routes_gone_from_the_table_are_dropped() -> None:
    table = [Route(id="r", method="GET", url_pattern="/r"), Route(id="s", method="GET", url_pattern="/s")]
    rates = Rates(Clock(), table)
    assert rates.take("r", RATE, "a") is None
    assert rates.take("r", RATE, "a") == 10
    del table[0]  # route r removed
    assert rates.take("s", RATE, "a") is None  # making s's buckets drops r's
    assert set(rates._limiters) == {"s"}
