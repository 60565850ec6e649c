# -*- test-case-name: tests.unit.test_user_api -*-
"""
Requests waiting in a queue for admission (a route's ``queue``, or the
server's), each under the handler id it will have, so that the control API
lists and kills them like running handlers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from kapow.core.routes import Match
from kapow.handlers.admission import Admission
from kapow.user.answers import Answer, Later, settle

__all__ = ["Waiting", "WaitingRequests"]

log = Logger()


@dataclass(eq=False)
class Waiting:
    """A request waiting for admission."""

    #: the handler id it will have
    id: str
    found: Match
    request: Request
    #: when it began to wait (``seconds()`` of the clock)
    since: float
    #: the admission's answer to come: ``None`` (admitted) or why not
    verdict: Deferred[str | None]
    #: what the request is answered with
    answer: Later = field(default_factory=Deferred)


class WaitingRequests:
    """
    The requests waiting for admission now.

    :param clock: tells when each began to wait.
    :param admission: is given back a slot that came for a request that left.
    :param new_id: makes the handler id of each.
    :param admitted: answers a request once its wait is over: given it and
        ``None`` (admitted) or the reason it was refused.
    """

    def __init__(
        self,
        clock: IReactorTime,
        admission: Admission,
        new_id: Callable[[], str],
        admitted: Callable[[Waiting, str | None], Answer],
    ) -> None:
        self.clock = clock
        self.admission = admission
        self.new_id = new_id
        self.admitted = admitted
        self._waiting: dict[str, Waiting] = {}

    def wait(
        self, request: Request, found: Match, verdict: Deferred[str | None], handler_id: str | None = None
    ) -> Later:
        """Let ``request`` wait for ``verdict``, the admission's answer, as ``handler_id`` (a fresh id by default)."""
        waiting = Waiting(handler_id or self.new_id(), found, request, self.clock.seconds(), verdict)
        self._waiting[waiting.id] = waiting
        request.kapow_handler_id = waiting.id  # type: ignore[attr-defined]  # our mark, read by the site
        request.notifyFinish().addErrback(lambda _: self.withdraw(waiting.id, "its client left"))
        verdict.addCallbacks(self._over, lambda f: f.trap(CancelledError), (waiting,))
        return waiting.answer

    def withdraw(self, handler_id: str, why: str) -> Waiting | None:
        """
        Take the request that waits as ``handler_id`` out of its queue, if
        it still waits: no process starts for it, and it is not answered.
        """
        waiting = self._waiting.pop(handler_id, None)
        if waiting is None:
            return None
        log.info(
            "handler {id} of route {route} left the queue: {why}",
            id=waiting.id, route=waiting.found.route.id, why=why,
        )  # fmt: skip
        waiting.verdict.cancel()
        return waiting

    def get(self, handler_id: str) -> Waiting | None:
        """The request that waits as ``handler_id``, if any."""
        return self._waiting.get(handler_id)

    def now(self) -> list[Waiting]:
        """Every request waiting now, longest first."""
        return list(self._waiting.values())

    def _over(self, refusal: str | None, waiting: Waiting) -> None:
        if self._waiting.pop(waiting.id, None) is None:  # withdrawn, but the slot came first
            if refusal is None:
                self.admission.release(waiting.found.route)
            return
        settle(waiting.answer, self.admitted(waiting, refusal))
