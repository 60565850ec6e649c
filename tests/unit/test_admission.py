"""
kapow.handlers.admission: concurrency limits and their queues, on a fake clock:
first come first served, full queues, queue timeouts, withdrawal, and the
server's limit beside the routes'.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from kapow.core.routes import Route
from kapow.handlers.admission import LocalAdmission, ServerQueue, Slots, Want
from kapow.handlers.governor import Governor

ONE = Want("r1", limit=1)
QUEUED = Want("r1", limit=1, queue=3, queue_timeout=5)


class SlotsTests(SynchronousTestCase):
    def make(self, **server: Any) -> Slots:
        self.clock = Clock()
        return Slots(self.clock, ServerQueue(**server))

    def waiting(self, verdict: object) -> Deferred[str | None]:
        assert isinstance(verdict, Deferred), verdict
        self.assertNoResult(verdict)
        return verdict

    def test_no_limits(self) -> None:
        slots = self.make()
        free = Want("r1")
        self.assertFalse(slots.limited(free))
        for _ in range(100):
            self.assertIsNone(slots.admit(free))

    def test_route_limit_without_a_queue_refuses_at_once(self) -> None:
        slots = self.make()
        self.assertIsNone(slots.admit(ONE))
        self.assertEqual(slots.admit(ONE), "route limit of 1 handlers reached")
        self.assertIsNone(slots.admit(Want("r2", limit=1)))  # another route has its own slots
        slots.release(ONE)
        self.assertIsNone(slots.admit(ONE))

    def test_queued_requests_get_the_slot_in_arrival_order(self) -> None:
        slots = self.make()
        self.assertIsNone(slots.admit(QUEUED))
        order: list[str] = []
        for name in ("a", "b", "c"):
            self.waiting(slots.admit(QUEUED)).addCallback(lambda refusal, n=name: order.append(n))
        self.assertEqual(slots.waiting(), 3)
        for expected in (["a"], ["a", "b"], ["a", "b", "c"]):
            slots.release(QUEUED)
            self.assertEqual(order, expected)
            self.assertEqual(slots.per_route["r1"], 1)  # the slot went on, never free in between
        slots.release(QUEUED)
        self.assertEqual((slots.total, slots.waiting()), (0, 0))

    def test_a_newcomer_never_overtakes_a_waiting_request(self) -> None:
        slots = self.make()
        slots.admit(QUEUED)
        first = self.waiting(slots.admit(QUEUED))
        slots.release(QUEUED)
        self.assertIsNone(self.successResultOf(first))
        self.waiting(slots.admit(QUEUED))  # the slot is the first one's now

    def test_a_full_queue_refuses_at_once(self) -> None:
        slots = self.make()
        slots.admit(QUEUED)
        for _ in range(3):
            self.waiting(slots.admit(QUEUED))
        self.assertEqual(slots.admit(QUEUED), "route queue of 3 is full")

    def test_a_request_that_waited_too_long_is_refused(self) -> None:
        slots = self.make()
        slots.admit(QUEUED)
        late = self.waiting(slots.admit(QUEUED))
        self.clock.advance(4.9)
        self.assertNoResult(late)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(late), "waited 5s in the queue")
        self.assertEqual(slots.waiting(), 0)
        slots.release(QUEUED)
        self.assertEqual(slots.total, 0)  # nobody took the slot

    def test_a_withdrawn_request_leaves_the_queue_and_its_timer(self) -> None:
        slots = self.make()
        slots.admit(QUEUED)
        gone = self.waiting(slots.admit(QUEUED))
        after = self.waiting(slots.admit(QUEUED))
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.assertEqual(slots.waiting(), 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        slots.release(QUEUED)
        self.assertIsNone(self.successResultOf(after))

    def test_the_server_limit_and_its_queue(self) -> None:
        slots = self.make(max_handlers=2, queue=1, queue_timeout=2)
        free = Want("r9")
        self.assertTrue(slots.limited(free))
        self.assertIsNone(slots.admit(free))
        self.assertIsNone(slots.admit(Want("r8")))
        waiting = self.waiting(slots.admit(free))
        self.assertEqual(slots.admit(free), "server queue of 1 is full")
        slots.release(Want("r8"))
        self.assertIsNone(self.successResultOf(waiting))
        self.assertEqual(slots.total, 2)
        late = self.waiting(slots.admit(free))
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(late), "waited 2s in the queue")

    def test_the_server_limit_without_a_queue(self) -> None:
        slots = self.make(max_handlers=1)
        slots.admit(Want("r1"))
        self.assertEqual(slots.admit(Want("r2")), "server limit of 1 handlers reached")

    def test_a_full_server_is_the_server_queues_business(self) -> None:
        # its route has room and a queue, the server none: the server's queue decides
        slots = self.make(max_handlers=1)
        self.assertIsNone(slots.admit(Want("other")))
        self.assertEqual(slots.admit(QUEUED), "server limit of 1 handlers reached")
        slots = self.make(max_handlers=1, queue=1)
        self.assertIsNone(slots.admit(Want("other")))
        waiting = self.waiting(slots.admit(QUEUED))
        slots.release(Want("other"))
        self.assertIsNone(self.successResultOf(waiting))

    def test_a_free_slot_goes_to_the_first_request_that_fits(self) -> None:
        slots = self.make(max_handlers=2, queue=5)
        slots.admit(QUEUED)
        slots.admit(Want("r2"))
        blocked = self.waiting(slots.admit(QUEUED))  # its route is full
        fits = self.waiting(slots.admit(Want("r3")))  # only the server is full
        slots.release(Want("r2"))
        self.assertNoResult(blocked)
        self.assertIsNone(self.successResultOf(fits))

    def test_an_answer_that_gives_the_slot_back_hands_it_on(self) -> None:
        slots = self.make()
        slots.admit(QUEUED)
        first = self.waiting(slots.admit(QUEUED))
        second = self.waiting(slots.admit(QUEUED))
        first.addCallback(lambda _: slots.release(QUEUED))  # its process could not start
        slots.release(QUEUED)
        self.assertIsNone(self.successResultOf(second))
        self.assertEqual((slots.total, slots.waiting()), (1, 0))

    def test_refusing_every_waiting_request(self) -> None:
        slots = self.make()
        slots.admit(QUEUED)
        waiting = [self.waiting(slots.admit(QUEUED)) for _ in range(2)]
        slots.refuse_waiting("the server is stopping")
        self.assertEqual([self.successResultOf(d) for d in waiting], ["the server is stopping"] * 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_want_of_a_route(self) -> None:
        route = Route("r1", "GET", "/x", max_concurrency=2, queue=4, queue_timeout=1.5)
        self.assertEqual(Want.of(route), Want("r1", 2, 4, 1.5))
        self.assertEqual(Want.of(Route("r2", "GET", "/y")), Want("r2", None, 0, 30.0))


class LocalAdmissionTests(SynchronousTestCase):
    def make(self, **server: Any) -> tuple[Governor, LocalAdmission]:
        clock = Clock()
        governor = Governor(clock)
        return governor, LocalAdmission(governor, Slots(clock, ServerQueue(**server)))

    def test_unlimited_routes_take_no_slot(self) -> None:
        _, admission = self.make()
        route = Route("r1", "GET", "/x")
        self.assertIsNone(admission.admit(route))
        admission.release(route)
        self.assertEqual(admission.slots.total, 0)

    def test_a_stop_refuses_new_and_waiting_requests(self) -> None:
        governor, admission = self.make()
        route = Route("r1", "GET", "/x", max_concurrency=1, queue=2)
        self.assertIsNone(admission.admit(route))
        waiting = admission.admit(route)
        assert isinstance(waiting, Deferred)
        governor.stop_admitting()
        self.assertEqual(self.successResultOf(waiting), "the server is stopping")
        self.assertEqual(admission.admit(route), "the server is stopping")
