"""A worker's admission of its handlers, without processes: the link to the main process is faked."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from kapow.governor import Governor, Limits
from kapow.routes import Route
from kapow.worker import MainAdmission
from kapow.workers import Admit, Release


class Link:
    """Records the calls a worker makes to the main process and answers with ``answer``."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[tuple[Any, dict]] = []

    def callRemote(self, command: Any, **arguments: Any) -> Deferred[Any]:
        self.calls.append((command, arguments))
        return self.answer() if callable(self.answer) else succeed(self.answer)


LIMITED = Route("r1", "GET", "/x", command="true", max_concurrency=1)
FREE = Route("r2", "GET", "/y", command="true")


def admission(link: Link, max_handlers: int | None = None) -> MainAdmission:
    return MainAdmission(Governor(Clock(), Limits()), max_handlers, link)  # type: ignore[arg-type]


class MainAdmissionTests(TestCase):
    def test_unlimited_routes_cost_no_round_trip(self) -> None:
        link = Link({"refusal": None})
        self.assertIsNone(admission(link).admit(FREE))
        admission(link).release(FREE)
        self.assertEqual(link.calls, [])

    def test_limits_are_decided_by_the_main_process(self) -> None:
        link = Link({"refusal": "route limit of 1 handlers reached"})
        refusal = self.successResultOf(admission(link).admit(LIMITED))
        self.assertEqual(refusal, "route limit of 1 handlers reached")
        admission(link, max_handlers=4).release(FREE)
        self.assertEqual(
            link.calls,
            [(Admit, {"route_id": "r1", "limit": 1}), (Release, {"route_id": "r2", "limited": False})],
        )

    def test_a_main_process_that_cannot_answer_refuses(self) -> None:
        link = Link(lambda: fail(ConnectionError("gone")))
        refusal = self.successResultOf(admission(link).admit(LIMITED))
        self.assertEqual(refusal, "the main process does not answer")
