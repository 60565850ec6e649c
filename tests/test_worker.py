"""A worker's admission of its handlers, without processes: the link to the main process is faked."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from kapow.governor import Governor, Limits
from kapow.routes import Route
from kapow.worker import MainAdmission
from kapow.workers import Admit, Release, Withdraw


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
            [
                (Admit, {"route_id": "r1", "limit": 1, "ticket": 1}),
                (Release, {"route_id": "r2", "limited": False}),
            ],
        )

    def test_a_main_process_that_cannot_answer_refuses(self) -> None:
        link = Link(lambda: fail(ConnectionError("gone")))
        refusal = self.successResultOf(admission(link).admit(LIMITED))
        self.assertEqual(refusal, "the main process does not answer")

    def test_a_queued_route_sends_its_queue(self) -> None:
        link = Link({})
        queued = Route("r3", "GET", "/z", command="true", max_concurrency=1, queue=5, queue_timeout=2.5)
        self.assertIsNone(self.successResultOf(admission(link).admit(queued)))
        self.assertEqual(
            link.calls,
            [(Admit, {"route_id": "r3", "limit": 1, "ticket": 1, "queue": 5, "queue_timeout": 2.5})],
        )

    def test_withdrawing_a_waiting_request_tells_the_main_process(self) -> None:
        pending: Deferred[dict] = Deferred()
        link = Link(lambda: pending)
        waiting = admission(link).admit(LIMITED)
        assert isinstance(waiting, Deferred)
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(link.calls[-1], (Withdraw, {"ticket": 1}))
        pending.callback({})  # the slot came before the withdrawal arrived: it goes back
        self.assertEqual(link.calls[-1], (Release, {"route_id": "r1", "limited": True}))

    def test_a_refusal_after_a_withdrawal_gives_nothing_back(self) -> None:
        pending: Deferred[dict] = Deferred()
        link = Link(lambda: pending)
        waiting = admission(link).admit(LIMITED)
        assert isinstance(waiting, Deferred)
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        pending.callback({"refusal": "withdrawn"})
        self.assertEqual([command for command, _ in link.calls], [Admit, Withdraw])

    def test_a_graceful_stop_refuses_the_waiting_requests(self) -> None:
        pending: Deferred[dict] = Deferred()
        link = Link(lambda: pending)
        governor = Governor(Clock(), Limits())
        waiting = MainAdmission(governor, None, link).admit(LIMITED)  # type: ignore[arg-type]
        governor.stop_admitting()
        self.assertEqual(self.successResultOf(waiting), "the server is stopping")
        self.assertEqual(link.calls[-1], (Withdraw, {"ticket": 1}))
        pending.callback({})
        self.assertEqual(link.calls[-1], (Release, {"route_id": "r1", "limited": True}))
