# -*- test-case-name: tests.unit.test_user_api -*-
"""
The user interface: match each request against the route table, check the
route's ``auth``, admit it under the concurrency limits (or queue it), start
the route's process for it and complete the response when that process
exits; and show and end its live handlers for the control API.

A Klein app of one ``branch=True`` catch-all, because routes change at
runtime and matching is the route table's: werkzeug neither merges slashes
nor redirects, and :class:`UserResource` hands every request to the
catch-all with the path as sent. Waiting for admission is
:mod:`kapow.user.waiting`'s, a handler's life :mod:`kapow.user.running`'s,
the site and its access log :mod:`kapow.user.site`'s.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import unquote

from klein import Klein, KleinRenderable
from klein.resource import KleinResource
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import NotFound
from werkzeug.routing import Rule

from kapow.core.auth import Refusal, RouteAuth, Verdict, address_in, normalize
from kapow.core.metrics import Metrics, refusal_kind
from kapow.core.routes import METHOD_NOT_ALLOWED, Match, Route, RouteTable
from kapow.core.runs import JobResult, RunRecord, shown
from kapow.core.traffic import retry_after
from kapow.handlers.admission import Admission
from kapow.handlers.governor import Governor
from kapow.handlers.handler import Handler, HandlerRegistry
from kapow.handlers.listing import HandlerShown
from kapow.handlers.rates import RateLimits, Rates
from kapow.streams.websocket import upgrade_refusal
from kapow.user.answers import Answer, Later, internal_error, plain
from kapow.user.handler_object import STATES, handler_object
from kapow.user.jobs import (
    DEFAULT_JOB_OUTPUT_MAX,
    DEFAULT_JOBS_PATH,
    JobBook,
    JobRequest,
    Jobs,
    ended_unrun,
    job_record,
)
from kapow.user.proxies import TrustedProxies
from kapow.user.running import HandlerSpawner, Runner
from kapow.user.waiting import Waiting, WaitingRequests
from kapow.web.errors import json_body, reason_body

__all__ = ["UserAPI", "UserResource"]

log = Logger()
_T = TypeVar("_T")

#: Paths and methods whose werkzeug route :class:`UserResource` keeps (the
#: least recently used forgotten first), and the longest path kept.
ROUTES_KEPT = 1024
KEPT_LENGTH = 256

_REFUSED = {401: b"Unauthorized\n", 403: b"Forbidden\n", 503: b"Service Unavailable\n"}


@dataclass(eq=False)
class UserAPI:
    """
    The user interface as a Klein application.

    :param routes: the live route table.
    :param handlers: where handlers are registered by id.
    :param spawner: starts the routes' processes.
    :param governor: times and ends them.
    :param admission: admits them (``admit(route)`` answers ``None``, a
        reason to refuse, or a Deferred of either, which may be cancelled to
        withdraw the request; ``release(route)`` when an admitted handler
        exited).
    :param reactor: the clock of the queues, and a POSIX reactor's threads
        for the slow credential checks.
    :param proxies: the trusted proxies whose forwarding headers name the
        client, if any.
    :param metrics: where requests and handlers are counted, if anywhere.
    :param history: given the run record of every handler whose process
        ended, if the history is kept.
    :param jobs: where jobs are kept (in this process by default, without a history).
    :param jobs_path: the path under which jobs are asked for (``--jobs-path``).
    :param job_output_max: the most bytes of a job's body kept (``--job-output-max``).
    :param server_name: the server's name in the run records (``--server-name``).
    :param rates: decides the routes' rate limits (in this process by default).

    It is also the control API's view of its handlers
    (:class:`kapow.handlers.listing.HandlersListing`).
    """

    routes: RouteTable
    handlers: HandlerRegistry
    spawner: HandlerSpawner
    governor: Governor
    admission: Admission
    reactor: IReactorTime
    proxies: TrustedProxies | None = None
    metrics: Metrics | None = None
    history: Callable[[RunRecord], None] | None = None
    jobs: JobBook = field(default_factory=lambda: Jobs(None))
    jobs_path: str = DEFAULT_JOBS_PATH
    job_output_max: int = DEFAULT_JOB_OUTPUT_MAX
    server_name: str = ""
    rates: RateLimits = field(default=None)  # type: ignore[assignment]  # made from the reactor
    runner: Runner = field(init=False)
    waiting: WaitingRequests = field(init=False)

    app = Klein()
    # the path reaches the route table as sent: no slashes merged, no redirects
    app.url_map.merge_slashes = False

    def __post_init__(self) -> None:
        self.runner = Runner(
            self.handlers,
            self.spawner,
            self.governor,
            self.admission,
            self.reactor,
            self.metrics,
            self.history,
            self.jobs,
            self.server_name,
        )
        self.governor.on_stopping.append(self.runner.going_away)
        self._jobs_prefix = self.jobs_path.rstrip("/") + "/"
        if self.rates is None:
            self.rates = Rates(self.reactor, self.routes)
        self._kept_guards: dict[str, RouteAuth] = {}
        self.waiting = WaitingRequests(self.reactor, self.admission, self.handlers.new_id, self._admitted)

    def resource(self) -> UserResource:
        """The Twisted resource serving this interface."""
        return UserResource(self)

    @app.route("/", branch=True, strict_slashes=False)
    def serve(self, request: Request) -> Answer:
        """Every request: its route's handler, or the reason there is none."""
        metrics = self.metrics
        if metrics is not None:
            request.kapow_started = metrics.clock.seconds()  # type: ignore[attr-defined]  # our mark, read by the site
        if self.proxies is not None:
            self.proxies.apply(request)
        path = unquote(request.path.decode("latin-1"), errors="surrogateescape")
        if path.startswith(self._jobs_prefix):
            return self._job_asked(request, path[len(self._jobs_prefix) :])
        if request.method == b"OPTIONS":
            preflight = self._preflight(request, path)
            if preflight is not None:
                return preflight
        found = self.routes.match(request.method.decode("latin-1"), path)
        if found is None:
            return plain(request, 404, b"Not Found\n")
        if found is METHOD_NOT_ALLOWED:
            request.setHeader(b"Allow", ", ".join(self.routes.methods_for(path)).encode())
            return plain(request, 405, b"Method Not Allowed\n")
        route = found.route
        if metrics is not None:
            request.kapow_route = route  # type: ignore[attr-defined]  # our mark, read by the site
        if route.cors is not None:
            self._cross_origin(request, route)
        if route.rate is not None:
            return self._rate_limited(request, found)
        return self._guarded(request, found)

    def _guarded(self, request: Request, found: Match) -> Answer:
        """The route's ``allow`` and ``auth``, then its admission."""
        guard = found.route.guard
        if guard is not None:
            return self._authenticate(request, found, guard)
        return self._admit(request, found)

    # -- traffic policy (SPEC §13) ---------------------------------------------

    def _preflight(self, request: Request, path: str) -> bytes | None:
        """A CORS preflight to a route with ``cors``, answered here (``None``: not one)."""
        origin = request.getHeader(b"origin")
        wanted = request.getHeader(b"access-control-request-method")
        if origin is None or wanted is None:
            return None
        found = self.routes.match(wanted.decode("latin-1"), path)
        if not isinstance(found, Match) or found.route.cors_policy is None:
            return None
        headers = request.getHeader(b"access-control-request-headers")
        code, answer = found.route.cors_policy.preflight(
            origin.decode("latin-1"),
            wanted.decode("latin-1"),
            found.route.method,
            None if headers is None else headers.decode("latin-1"),
        )
        request.setResponseCode(code)
        for name, value in answer:
            request.setHeader(name.encode(), value.encode("latin-1"))
        return b""

    def _cross_origin(self, request: Request, route: Route) -> None:
        """The CORS headers of a request from an origin ``route`` allows, on whatever it is answered."""
        origin = request.getHeader(b"origin")
        assert route.cors_policy is not None  # the route has cors
        for name, value in route.cors_policy.response_headers(
            None if origin is None else origin.decode("latin-1")
        ):
            request.responseHeaders.addRawHeader(name.encode(), value.encode("latin-1"))

    def _rate_limited(self, request: Request, found: Match) -> Answer:
        """``allow`` first, then the route's ``rate``, then the rest of its checks."""
        route = found.route
        assert route.rate is not None  # a rated route
        remote = getattr(request.getClientAddress(), "host", "")
        guard = route.guard
        if guard is not None and guard.networks is not None and not address_in(remote, guard.networks):
            return self._guarded(request, found)  # refused by the allow list, before the rate counts it
        wait = self.rates.take(route.id, route.rate, remote if route.rate["key"] == "client" else "")
        if isinstance(wait, Deferred):
            return cast(Later, wait.addCallback(self._rate_answered, request, found))
        return self._rate_answered(wait, request, found)

    def _rate_answered(self, wait: float | None, request: Request, found: Match) -> Answer:
        if wait is None:
            return self._guarded(request, found)
        # not logged: under a flood its access log line (429) and its count (why="rate") are enough
        self._refused(found.route, "rate")
        _drop_body(request)
        request.setHeader(b"Retry-After", b"%d" % retry_after(wait))
        return plain(request, 429, b"Too Many Requests\n")

    @app.handle_errors(NotFound)
    def _unroutable(self, request: IRequest, failure: Failure) -> bytes:
        # a path even the catch-all cannot take is one no route matches
        return plain(request, 404, b"Not Found\n")

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("Unhandled error answering {uri}", failure, uri=request.uri)
        return internal_error(request)

    # -- refusals before any process starts -----------------------------------

    def _authenticate(self, request: Request, found: Match, guard: RouteAuth) -> Answer:
        """Check the route's ``auth`` before anything else happens for the request."""
        checked = self._check(request, guard)
        if isinstance(checked, Deferred):
            later = checked.addCallback(self._authenticated_later, request, found)
            later.addErrback(self._authentication_failed, request)
            return cast(Later, later)  # the answer a callback returns later is waited for
        return self._authenticated(request, found, *checked)

    def _check(self, request: Request, guard: RouteAuth) -> Verdict | Deferred[Verdict]:
        """What the route's ``allow`` and ``auth`` say of ``request``."""
        body = request.content
        assert body is not None  # twisted.web renders a request once its body is in
        host = getattr(request.getClientAddress(), "host", "")
        return guard.check(host, request.requestHeaders, body, self._in_thread)

    def _in_thread(self, f: Callable[..., _T], *args: object) -> Deferred[_T]:
        reactor = cast(IReactorThreads, self.reactor)  # a POSIX reactor, which has threads
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    def _authenticated(
        self, request: Request, found: Match, refusal: Refusal | None, user: bytes | None
    ) -> Answer:
        if refusal is None:
            if user is not None:
                request.kapow_auth_user = user  # type: ignore[attr-defined]  # our mark, read by the site
            return self._admit(request, found)
        _log_refusal(request, found.route, refusal.why)
        self._refused(found.route, "auth")
        _drop_body(request)
        if refusal.challenge is not None:
            request.setHeader(b"WWW-Authenticate", refusal.challenge)
        return plain(request, refusal.code, _REFUSED.get(refusal.code, b"Refused\n"))

    def _authenticated_later(self, checked: Verdict, request: Request, found: Match) -> Answer | None:
        if request._disconnected:
            _drop_body(request)
            return None
        return self._authenticated(request, found, *checked)

    def _authentication_failed(self, failure: Failure, request: Request) -> bytes | None:
        log.failure("checking credentials failed", failure)
        _drop_body(request)
        if request._disconnected or request.finished:
            return None
        return internal_error(request)

    def _refused(self, route: Route, why: str | None) -> None:
        """A request for ``route`` was refused (``why``: auth, concurrency, ...; ``None``: not counted)."""
        if self.metrics is not None and why is not None:
            self.metrics.refused_request(route, why)

    def _admit(self, request: Request, found: Match) -> Answer:
        route = found.route
        if route.job:
            return self._start_job(request, found)
        if route.mode == "websocket":
            refusal = upgrade_refusal(request, route)
            if refusal is not None:
                code, body, headers = refusal
                for name, value in headers:
                    request.setHeader(name, value)
                return plain(request, code, body)
        verdict = self.admission.admit(route)
        if isinstance(verdict, Deferred):
            return self.waiting.wait(request, found, verdict)
        if verdict is not None:
            return self._unavailable(request, found.route, verdict)
        return self.runner.start(request, found)

    # -- jobs ------------------------------------------------------------------

    def _start_job(self, request: Request, found: Match) -> Answer:
        """
        A request to a job route: 202 at once (or the usual 503), its
        process run as usual once admitted, its response kept.
        """
        route = found.route
        verdict = self.admission.admit(route)
        if isinstance(verdict, Deferred) and not route.queue:
            # a verdict that takes a question (to the main process of --workers), not a queue: wait for it
            return cast(Later, verdict.addCallback(self._job_admitted, request, found))
        return self._job_admitted(verdict, request, found)

    def _job_admitted(
        self, verdict: str | Deferred[str | None] | None, request: Request, found: Match
    ) -> Answer:
        route = found.route
        if isinstance(verdict, str):
            return self._unavailable(request, route, verdict)
        job_id = self.handlers.new_id()
        job = JobRequest(request, self.job_output_max)
        self.jobs.started(
            job_record(job_id, route, request, self.reactor.seconds(), self.server_name), "queued"
        )
        if verdict is None:
            answer: Answer = self.runner.start(job.as_request(), found, job_id)
        else:
            answer = self.waiting.wait(job.as_request(), found, verdict, job_id)
        if isinstance(answer, Deferred):
            answer.addCallback(lambda later: self._job_unanswered(job, job_id, found, later))
        else:
            self._job_unanswered(job, job_id, found, answer)
        request.kapow_handler_id = job_id  # type: ignore[attr-defined]  # our mark, read by the site
        location = f"{self._jobs_prefix}{job_id}"
        request.setHeader(b"Location", location.encode())
        return json_body(request, 202, {"id": job_id, "status_url": location})

    def _job_unanswered(self, job: JobRequest, job_id: str, found: Match, answer: bytes | None) -> None:
        """A job answered without a process (refused once queued, or unable to start): it is over."""
        if answer is not None:  # else its handler answers it
            ended_unrun(self.jobs, job, job_id, found.route, self.reactor.seconds(), self.server_name, answer)

    def _job_asked(self, request: Request, rest: str) -> Answer:
        """``GET {jobs_path}/{id}`` and ``GET {jobs_path}/{id}/result``."""
        job_id, slash, what = rest.partition("/")
        if request.method not in (b"GET", b"HEAD") or (slash and what != "result"):
            return reason_body(request, 404, "Job Not Found")
        asked = self.jobs.status(job_id).addCallback(self._job_found, request, job_id, what == "result")
        return cast(Later, asked.addErrback(self._jobs_unavailable, request))

    def _jobs_unavailable(self, failure: Failure, request: Request) -> bytes:
        """Where the jobs are kept cannot be reached (a cluster's database is down): 503."""
        log.warn("cannot answer for a job: {why}", why=failure.getErrorMessage())
        request.setHeader(b"Retry-After", b"5")
        return reason_body(request, 503, "Service Unavailable")

    def _job_found(
        self, found: tuple[str, RunRecord] | None, request: Request, job_id: str, result: bool
    ) -> Answer:
        if found is None:
            return reason_body(request, 404, "Job Not Found")
        state, record = found
        route = self.routes.find(record["route_id"])
        if route is not None and route.cors is not None:
            self._cross_origin(request, route)
        guard = route.guard if route is not None else self._kept_guard(record.get("_guard"))

        def answer(checked: Verdict) -> Answer:
            refusal = checked[0]
            if refusal is not None:
                if route is not None:
                    self._refused(route, "auth")
                if refusal.challenge is not None:
                    request.setHeader(b"WWW-Authenticate", refusal.challenge)
                return plain(request, refusal.code, _REFUSED.get(refusal.code, b"Refused\n"))
            if not result:
                return json_body(request, 200, {**shown(record), "state": state})
            if state != "done":
                return reason_body(request, 409, "Job Not Finished")
            return cast(Later, self.jobs.result(job_id).addCallback(_job_result, request))

        if guard is None:
            return answer((None, None))
        checked = self._check(request, guard)
        if isinstance(checked, Deferred):
            return cast(Later, checked.addCallback(answer))
        return answer(checked)

    def _kept_guard(self, spec: object) -> RouteAuth | None:
        """
        The ``allow`` and ``auth`` kept with a job whose route this server
        does not have (another server's of a cluster, or this one's before a
        restart), checked with this server's copy of the files they name.
        """
        if not isinstance(spec, dict):
            return None
        key = json.dumps(spec, sort_keys=True)
        guard = self._kept_guards.get(key)
        if guard is None:
            guard = self._kept_guards[key] = RouteAuth(normalize(spec), strict=False)
        return guard

    def _admitted(self, waiting: Waiting, refusal: str | None) -> Answer:
        """A queued request's wait is over."""
        if refusal is not None:
            return self._unavailable(waiting.request, waiting.found.route, refusal)
        return self.runner.start(waiting.request, waiting.found, waiting.id)

    def _unavailable(self, request: Request, route: Route, refusal: str) -> bytes:
        """The answer to a request the admission refused, for ``refusal``."""
        log.info(
            "refused {method} {path}: {why}",
            method=request.method.decode("latin-1"),
            path=unquote(request.path.decode("latin-1"), errors="surrogateescape"),
            why=refusal,
        )
        self._refused(route, refusal_kind(refusal))
        request.setHeader(b"Retry-After", b"1")
        return plain(request, 503, b"Service Unavailable\n")

    def queued_routes(self) -> list[Route]:
        """The route of every request waiting in a queue now."""
        return [waiting.found.route for waiting in self.waiting.now()]

    # -- handlers as the control API shows them --------------------------------

    def listing(self) -> list[HandlerShown]:
        """Every live handler, queued or running, oldest first."""
        found = [self._waiting_info(waiting) for waiting in self.waiting.now()]
        found += [info for h in self.handlers.live() if (info := self._handler_info(h)) is not None]
        return sorted(found, key=lambda info: info["started"])

    def handler_info(self, handler_id: str) -> HandlerShown | None:
        """One live handler, or ``None``."""
        waiting = self.waiting.get(handler_id)
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
        waiting = self.waiting.withdraw(handler_id, "killed over the control API")
        if waiting is None:
            return self.runner.kill(handler_id)
        refusal = "killed over the control API while queued"
        waiting.answer.callback(self._unavailable(waiting.request, waiting.found.route, refusal))
        return True

    def _waiting_info(self, waiting: Waiting) -> HandlerShown:
        return handler_object(
            waiting.id, waiting.found.route.id, waiting.request, None, waiting.since, "queued"
        )

    def _handler_info(self, handler: Handler) -> HandlerShown | None:
        started = self.governor.started_at(handler.id)
        if started is None:
            return None
        state = (
            "websocket"
            if handler.route.mode == "websocket"
            else STATES.get(handler.state, handler.state.value)
        )
        return handler_object(
            handler.id, handler.route.id, handler.request, self.governor.pid(handler.id), started, state
        )


def _log_refusal(request: Request, route: Route, why: str) -> None:
    log.info(
        "refused {method} {path} (route {route}): {why}",
        method=request.method.decode("latin-1"),
        path=unquote(request.path.decode("latin-1"), errors="surrogateescape"),
        route=route.id,
        why=why,
    )


def _drop_body(request: Request) -> None:
    """Let go of a refused request's body (a temporary file above 100 kB) at once."""
    content = request.content
    request.content = io.BytesIO()
    if content is not None:
        content.close()


class UserResource(KleinResource):
    """
    The resource of a :class:`UserAPI`: every request reaches its catch-all,
    whatever its path, and leaves with the app's answer.

    Unlike :class:`klein.resource.KleinResource`, it takes what twisted.web
    gives as it is: werkzeug matches the path as sent (percent escapes and
    all, so a path whose escapes are not UTF-8 is no error), on a map bound
    once (the catch-all looks at neither host nor scheme). The app's answer
    (:data:`kapow.user.answers.Answer`) is a body, returned to twisted.web
    as a plain resource returns it (its length known); a Deferred of one,
    written when it comes; or ``None``, the request being its handler's
    now. A client that leaves cancels nothing: the app sees it go itself
    (a queued request leaves its queue, a handler's process is ended).

    :ivar api: the app it serves.
    """

    def __init__(self, api: UserAPI) -> None:
        super().__init__(api.app)
        self.api = api
        self._routing = api.app.url_map.bind("localhost")
        self._route = functools.lru_cache(ROUTES_KEPT)(self._route_of)

    def _route_of(self, path: str, method: str) -> tuple[Rule, Mapping[str, Any]]:
        """werkzeug's routing of ``path`` and ``method`` (``NotFound`` if none)."""
        return self._routing.match(path, method, return_rule=True)

    def render(self, request: IRequest) -> KleinRenderable:
        try:
            path, method = request.path.decode("latin-1"), request.method.decode("latin-1")
            # A path is routed the same way every time: werkzeug's match (a
            # few microseconds, and a closure per call that refers to itself,
            # left for the garbage collector) is done once per path kept.
            route = self._route if len(path) <= KEPT_LENGTH else self._route_of
            rule, values = route(path, method)
            answer = self._app.execute_endpoint(rule.endpoint, request, **values)
        except Exception:
            answer = self._error_answer(request, Failure())
        if isinstance(answer, Deferred):
            answer.addCallbacks(_write, self._write_error, callbackArgs=(request,), errbackArgs=(request,))
            answer.addErrback(_unwritten, request)
        elif answer is not None:
            return answer
        return NOT_DONE_YET  # type: ignore[return-value]  # twisted.web's marker, which Klein's own render returns too

    def _error_answer(self, request: IRequest, failure: Failure) -> KleinRenderable:
        """The answer of the app's first error handler for ``failure``."""
        for (
            kinds,
            handler,
        ) in self._app._error_handlers:  # Klein keeps them there, and its resource reads them so
            if failure.check(*kinds):
                return self._app.execute_error_handler(handler, request, failure)
        failure.raiseException()

    def _write_error(self, failure: Failure, request: IRequest) -> None:
        answer = self._error_answer(request, failure)
        assert answer is None or isinstance(answer, bytes)  # the app's error handlers answer at once
        _write(answer, request)


def _write(answer: bytes | None, request: IRequest) -> None:
    """Send an answer that came later, unless there is none or its client left."""
    if answer is None or request._disconnected or request.finished:  # type: ignore[attr-defined]  # a twisted.web Request
        return
    request.write(answer)
    request.finish()


def _unwritten(failure: Failure, request: IRequest) -> None:
    log.failure("Unhandled error writing the answer to {uri}", failure, uri=request.uri)


def _job_result(result: JobResult | None, request: Request) -> bytes:
    """A finished job's kept response, as its route would have answered it."""
    if result is None:
        return reason_body(request, 404, "Job Not Found")
    request.setResponseCode(result.status, result.reason.encode("latin-1"))
    for name, value in result.headers:
        request.responseHeaders.addRawHeader(name, value)
    request.setHeader(b"Content-Length", b"%d" % len(result.body))
    return result.body
