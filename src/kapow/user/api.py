"""
The user interface: match each request against the route table, check the
route's ``auth``, admit it under the concurrency limits (or queue it), start
the route's process for it and complete the response when that process
exits; and show and end its live handlers for the control API.

A plain leaf resource rather than a Klein app: routes change at runtime and
matching is the route table's (werkzeug's routing would merge slashes and
redirect, changing the paths operators match on). Its site and access log
are :mod:`kapow.user.site`'s.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast
from urllib.parse import unquote

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from kapow.core.auth import Refusal, RouteAuth
from kapow.core.metrics import Metrics, refusal_kind
from kapow.core.routes import METHOD_NOT_ALLOWED, Match, Route, RouteTable
from kapow.handlers.admission import Admission
from kapow.handlers.governor import Governor
from kapow.handlers.handler import Handler, HandlerRegistry
from kapow.handlers.listing import HandlerShown
from kapow.handlers.spawn import Spawner
from kapow.user.handler_object import STATES, handler_object
from kapow.user.proxies import TrustedProxies

__all__ = ["UserAPI"]

log = Logger()

#: What rendering a request answers: its body, or ``NOT_DONE_YET``.
Rendered = bytes | int
_T = TypeVar("_T")


@dataclass(eq=False)
class _Waiting:
    """A request waiting for admission (in a queue), under the handler id it will have."""

    id: str
    found: Match
    request: Request
    verdict: Deferred[str | None]
    since: float


class UserAPI(Resource):
    """
    :param routes: the live route table.
    :param handlers: where handlers are registered by id.
    :param spawner: starts the routes' processes.
    :param governor: times and ends them.
    :param admission: admits them (``admit(route)`` answers ``None``, a
        reason to refuse, or a Deferred of either, which may be cancelled to
        withdraw the request; ``release(route)`` when an admitted handler
        exited); the governor by default.
    :param proxies: the trusted proxies whose forwarding headers name the
        client, if any.
    :param metrics: where requests and handlers are counted, if anywhere.

    It is also the control API's view of its handlers
    (:class:`kapow.handlers.listing.HandlersListing`).
    """

    isLeaf = True

    def __init__(
        self,
        routes: RouteTable,
        handlers: HandlerRegistry,
        spawner: Spawner,
        governor: Governor,
        admission: Admission | None = None,
        proxies: TrustedProxies | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__()
        self.proxies = proxies
        self.metrics = metrics
        self.routes = routes
        self.handlers = handlers
        self.spawner = spawner
        self.governor = governor
        self.admission: Admission = governor if admission is None else admission
        self._waiting: dict[str, _Waiting] = {}

    def render(self, request: Request) -> Rendered:
        metrics = self.metrics
        if metrics is not None:
            request.kapow_started = metrics.clock.seconds()  # type: ignore[attr-defined]  # our mark, read by the site
        if self.proxies is not None:
            self.proxies.apply(request)
        path = unquote(request.path.decode("latin-1"), errors="surrogateescape")
        found = self.routes.match(request.method.decode("latin-1"), path)
        if found is None:
            return _plain(request, 404, b"Not Found\n")
        if found is METHOD_NOT_ALLOWED:
            request.setHeader(b"Allow", ", ".join(self.routes.methods_for(path)).encode())
            return _plain(request, 405, b"Method Not Allowed\n")
        if metrics is not None:
            request.kapow_route = found.route  # type: ignore[attr-defined]  # our mark, read by the site
        guard = found.route.guard
        if guard is not None:
            return self._authenticate(request, found, guard)
        return self._admit(request, found)

    def _authenticate(self, request: Request, found: Match, guard: RouteAuth) -> Rendered:
        """Check the route's ``auth`` before anything else happens for the request."""
        body = request.content
        assert body is not None  # twisted.web renders a request once its body is in
        checked = guard.check(
            getattr(request.getClientAddress(), "host", ""), request.requestHeaders, body, self._in_thread
        )
        if isinstance(checked, Deferred):
            checked.addCallback(self._authenticated_later, request, found)
            checked.addErrback(self._authentication_failed, request)
            return NOT_DONE_YET
        return self._authenticated(request, found, *checked)

    def _in_thread(self, f: Callable[..., _T], *args: object) -> Deferred[_T]:
        reactor = cast(IReactorThreads, self.spawner.reactor)  # a POSIX reactor, which has threads
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    def _authenticated(
        self, request: Request, found: Match, refusal: Refusal | None, user: bytes | None
    ) -> Rendered:
        if refusal is None:
            if user is not None:
                request.kapow_auth_user = user  # type: ignore[attr-defined]  # our mark, read by the site
            return self._admit(request, found)
        log.info(
            "refused {method} {path} (route {route}): {why}",
            method=request.method.decode("latin-1"),
            path=unquote(request.path.decode("latin-1"), errors="surrogateescape"),
            route=found.route.id,
            why=refusal.why,
        )
        self._refused(found.route, "auth")
        _drop_body(request)
        if refusal.challenge is not None:
            request.setHeader(b"WWW-Authenticate", refusal.challenge)
        return _plain(request, refusal.code, _REFUSED.get(refusal.code, b"Refused\n"))

    def _authenticated_later(
        self, checked: tuple[Refusal | None, bytes | None], request: Request, found: Match
    ) -> None:
        if request._disconnected:
            _drop_body(request)
            return
        body = self._authenticated(request, found, *checked)
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()

    def _authentication_failed(self, failure: Failure, request: Request) -> None:
        log.failure("checking credentials failed", failure)
        _drop_body(request)
        if not request._disconnected and not request.finished:
            request.write(_plain(request, 500, b"Internal Server Error\n"))
            request.finish()

    def _refused(self, route: Route, why: str | None) -> None:
        """A request for ``route`` was refused (``why``: auth, concurrency, ...; ``None``: not counted)."""
        if self.metrics is not None and why is not None:
            self.metrics.refused_request(route, why)

    def _admit(self, request: Request, found: Match) -> Rendered:
        verdict = self.admission.admit(found.route)
        if isinstance(verdict, Deferred):
            self._wait(request, found, verdict)
            return NOT_DONE_YET
        return self._start(request, found, verdict)

    # -- waiting for admission ----------------------------------------------

    def _wait(self, request: Request, found: Match, verdict: Deferred[str | None]) -> None:
        waiting = _Waiting(self.handlers.new_id(), found, request, verdict, self.governor.reactor.seconds())
        self._waiting[waiting.id] = waiting
        request.kapow_handler_id = waiting.id  # type: ignore[attr-defined]  # our mark, read by the site
        request.notifyFinish().addErrback(lambda _: self._withdraw(waiting, "its client left"))
        verdict.addCallbacks(self._admitted_later, lambda f: f.trap(CancelledError), (waiting,))

    def _withdraw(self, waiting: _Waiting, why: str) -> bool:
        """Take ``waiting`` out of its queue, if it still waits; no process starts for it."""
        if self._waiting.pop(waiting.id, None) is None:
            return False
        log.info(
            "handler {id} of route {route} left the queue: {why}",
            id=waiting.id, route=waiting.found.route.id, why=why,
        )  # fmt: skip
        waiting.verdict.cancel()
        return True

    def _admitted_later(self, refusal: str | None, waiting: _Waiting) -> None:
        if self._waiting.pop(waiting.id, None) is None:  # withdrawn, but the slot came first
            if refusal is None:
                self.admission.release(waiting.found.route)
            return
        request = waiting.request
        body = self._start(request, waiting.found, refusal, waiting.id)
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()

    def queued_routes(self) -> list[Route]:
        """The route of every request waiting in a queue now."""
        return [waiting.found.route for waiting in self._waiting.values()]

    # -- handlers as the control API shows them ------------------------------

    def listing(self) -> list[HandlerShown]:
        """Every live handler, queued or running, oldest first."""
        found = [self._waiting_info(w) for w in list(self._waiting.values())]
        found += [info for h in self.handlers.live() if (info := self._handler_info(h)) is not None]
        return sorted(found, key=lambda info: info["started"])

    def handler_info(self, handler_id: str) -> HandlerShown | None:
        """One live handler, or ``None``."""
        waiting = self._waiting.get(handler_id)
        if waiting is not None:
            return self._waiting_info(waiting)
        handler = self.handlers.get(handler_id)
        return None if handler is None else self._handler_info(handler)

    def kill(self, handler_id: str) -> bool:
        """
        End a live handler: a queued one leaves its queue (its client gets
        503); a running one's process group gets SIGTERM now (SIGKILL after
        the grace period), and its response completes when its process
        exits. ``False`` if there is no such handler.
        """
        waiting = self._waiting.get(handler_id)
        if waiting is not None:
            self._withdraw(waiting, "killed over the control API")
            body = self._start(waiting.request, waiting.found, "killed over the control API while queued")
            waiting.request.write(body)
            waiting.request.finish()
            return True
        handler = self.handlers.get(handler_id)
        if handler is None or self.governor.started_at(handler_id) is None:
            return False
        log.info(
            "handler {id} of route {route}: killed over the control API: ending its process group",
            id=handler.id, route=handler.route.id,
        )  # fmt: skip
        handler.ended_by = "killed"
        self.governor.terminate(handler_id)
        return True

    def _waiting_info(self, waiting: _Waiting) -> HandlerShown:
        return handler_object(
            waiting.id, waiting.found.route.id, waiting.request, None, waiting.since, "queued"
        )

    def _handler_info(self, handler: Handler) -> HandlerShown | None:
        started = self.governor.started_at(handler.id)
        if started is None:
            return None
        state = STATES.get(handler.state, handler.state.value)
        return handler_object(
            handler.id, handler.route.id, handler.request, self.governor.pid(handler.id), started, state
        )

    # -- one handler's life --------------------------------------------------

    def _start(
        self, request: Request, found: Match, refusal: str | None, handler_id: str | None = None
    ) -> Rendered:
        if refusal is not None:
            log.info(
                "refused {method} {path}: {why}",
                method=request.method.decode("latin-1"),
                path=unquote(request.path.decode("latin-1"), errors="surrogateescape"),
                why=refusal,
            )
            self._refused(found.route, refusal_kind(refusal))
            request.setHeader(b"Retry-After", b"1")
            return _plain(request, 503, b"Service Unavailable\n")
        handler = self.handlers.create(found.route, found.matches, request, handler_id)
        request.kapow_handler_id = handler.id  # type: ignore[attr-defined]  # our mark, read by the site
        try:
            stdin = handler.stdin() if found.route.stdin else None
        except OSError as e:
            self._not_started(handler, str(e))
            if self.metrics is not None:
                self.metrics.spawn_failed(found.route)
            return _plain(request, 500, b"Internal Server Error\n")
        self.governor.started(
            handler.id, found.route, None, lambda elapsed: self._timed_out(handler, elapsed)
        )
        handler.on_client_lost = lambda: self._client_lost(handler)
        if self.metrics is not None:
            self.metrics.handler_started(found.route)
        spawned = self.spawner.start(
            handler.id,
            found.route.argv(),
            lambda status, sig: self._exited(handler, status, sig),
            stdin,
            limits=found.route.limits,
        )
        if stdin is not None:  # the child has its own once the spawn is over
            spawned.addBoth(_closing, stdin)
        spawned.addCallbacks(
            lambda pgid: self._spawned(handler, pgid),
            lambda failure: self._spawn_failed(request, handler, failure),
        )
        return NOT_DONE_YET

    def _spawned(self, handler: Handler, pgid: int) -> None:
        if self.spawner.debug:  # an event per request costs, even filtered out
            log.debug("handler {id} started: pid {pid}", id=handler.id, pid=pgid)
        self.governor.spawned(handler.id, pgid)

    def _spawn_failed(self, request: Request, handler: Handler, failure: Failure) -> None:
        self.governor.exited(handler.id)
        self._not_started(handler, failure.getErrorMessage())
        if self.metrics is not None:
            self.metrics.handler_ended(handler.route, None)
        if not request._disconnected and not request.finished:
            request.write(_plain(request, 500, b"Internal Server Error\n"))
            request.finish()

    def _not_started(self, handler: Handler, why: str) -> None:
        """Give up a handler whose process could not start."""
        log.error(
            "handler {id}: route {route} cannot start: {why}",
            id=handler.id, route=handler.route.id, why=why,
        )  # fmt: skip
        self.handlers.forget(handler)
        handler.abandon()
        self.admission.release(handler.route)

    def _exited(self, handler: Handler, status: int | None, signal: int | None) -> None:
        elapsed = self.governor.exited(handler.id)
        self.admission.release(handler.route)
        if self.metrics is not None:
            outcome = handler.ended_by or ("signal" if signal is not None else "error" if status else "ok")
            self.metrics.handler_ended(handler.route, outcome)
        if signal is not None:
            log.info(
                "handler {id} killed by signal {signal} after {elapsed:.3f}s",
                id=handler.id, signal=signal, elapsed=elapsed,
            )  # fmt: skip
        elif status:
            log.info("handler {id} exited with status {status}", id=handler.id, status=status)
        error_status = handler.route.error_status
        if error_status is not None and (status or signal is not None) and not handler.fail(error_status):
            log.info(
                "handler {id} failed after its response started: status {code} not applied",
                id=handler.id, code=error_status,
            )  # fmt: skip
        self.handlers.forget(handler)
        handler.finish()

    def _timed_out(self, handler: Handler, elapsed: float) -> None:
        log.warn(
            "handler {id} of route {route} timed out after {elapsed:.3f}s: ending its process group",
            id=handler.id, route=handler.route.id, elapsed=elapsed,
        )  # fmt: skip
        self.handlers.forget(handler)
        handler.ended_by = "timeout"
        handler.time_out()
        self.governor.terminate(handler.id)

    def _client_lost(self, handler: Handler) -> None:
        if self.governor.keeps_running_on_disconnect(handler.route):
            log.info("handler {id}: client disconnected; the handler keeps running", id=handler.id)
            return
        log.info(
            "handler {id} of route {route}: client disconnected: ending its process group",
            id=handler.id, route=handler.route.id,
        )  # fmt: skip
        self.handlers.forget(handler)
        handler.ended_by = "disconnect"
        self.governor.terminate(handler.id)


def _closing(result: _T, fd: int) -> _T:
    """Close ``fd`` and pass ``result`` on."""
    os.close(fd)
    return result


_REFUSED = {401: b"Unauthorized\n", 403: b"Forbidden\n", 503: b"Service Unavailable\n"}


def _drop_body(request: Request) -> None:
    """Let go of a refused request's body (a temporary file above 100 kB) at once."""
    content = request.content
    request.content = io.BytesIO()
    if content is not None:
        content.close()


def _plain(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return body
