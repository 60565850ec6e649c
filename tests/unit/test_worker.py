"""
Admission across workers, without processes: a worker's side with the link to
the main process faked, and the main process's side without a connection.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from kapow.core.routes import Route
from kapow.handlers.admission import ServerQueue, Slots
from kapow.handlers.governor import Governor, Limits
from kapow.server.workers.messages import HANDLERS_PART, Admit, Release, Withdraw, handlers_page
from kapow.server.workers.pool import MainLink
from kapow.server.workers.worker import MainAdmission


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

    def test_a_lost_main_process_refuses_and_is_told_nothing(self) -> None:
        class Lost:
            def callRemote(self, command: Any, **arguments: Any) -> Any:
                raise ConnectionLost()

        governor = Governor(Clock(), Limits())
        lost = MainAdmission(governor, None, Lost())  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(lost.admit(LIMITED)), "the main process does not answer")
        lost.release(LIMITED)
        governor.stop_admitting()


class MainLinkTests(TestCase):
    """The main process's side: one queue for every worker, kept in its Slots."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.slots = Slots(self.clock, ServerQueue())
        self.one, self.two = MainLink(1, self.slots), MainLink(2, self.slots)

    def admit(self, link: MainLink, ticket: int) -> Any:
        return link.admit("r1", limit=1, queue=5, queue_timeout=10.0, ticket=ticket)

    def test_requests_of_every_worker_wait_in_one_queue_in_arrival_order(self) -> None:
        self.assertEqual(self.admit(self.one, 1), {})
        order: list[int] = []
        for link, ticket in ((self.two, 1), (self.one, 2), (self.two, 2)):
            waiting = self.admit(link, ticket)
            waiting.addCallback(lambda answer, n=link.number: order.append(n))
        self.one.release("r1", limited=True)
        self.assertEqual(order, [2])
        self.two.release("r1", limited=True)
        self.one.release("r1", limited=True)
        self.assertEqual(order, [2, 1, 2])

    def test_a_withdrawn_request_is_answered_and_takes_no_slot(self) -> None:
        self.admit(self.one, 1)
        waiting = self.admit(self.two, 7)
        self.two.withdraw(7)
        self.assertEqual(self.successResultOf(waiting), {"refusal": "withdrawn"})
        self.one.release("r1", limited=True)
        self.assertEqual(self.slots.total, 0)

    def test_a_dead_worker_gives_back_its_slots_and_leaves_the_queue(self) -> None:
        self.admit(self.one, 1)
        gone = self.admit(self.one, 2)
        later = self.admit(self.two, 1)
        self.one.release_all()
        self.assertEqual(self.successResultOf(gone), {"refusal": "withdrawn"})
        self.assertEqual(self.successResultOf(later), {})  # the dead worker's slot went on
        self.assertEqual((self.slots.total, self.slots.waiting()), (1, 0))

    def test_the_queue_timeout_is_the_routes(self) -> None:
        self.admit(self.one, 1)
        waiting = self.admit(self.two, 1)
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(waiting), {"refusal": "waited 10s in the queue"})


def test_the_handlers_of_a_worker_come_in_pages_that_fit_amp() -> None:
    handlers = [{"id": f"{n:032x}", "path": "/" + "x" * 1000} for n in range(150)]
    pages, after = [], ""
    while True:
        page, more = handlers_page(handlers, after)
        assert len(page) <= HANDLERS_PART
        found = json.loads(page)
        pages.append(found)
        if not more:
            break
        after = found[-1]["id"]
    assert len(pages) > 1
    assert [h for page in pages for h in page] == handlers
    assert handlers_page([], "") == (b"[]", False)
