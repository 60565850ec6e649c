"""
The user interface: match each request against the route table, start the
route's process for it and complete the response when that process exits.

A plain leaf resource rather than a Klein app: routes change at runtime and
matching is the route table's (werkzeug's routing would merge slashes and
redirect, changing the paths operators match on).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from kapow.governor import Governor
from kapow.handlers import Handler, HandlerRegistry
from kapow.routes import METHOD_NOT_ALLOWED, Match, RouteTable
from kapow.spawn import Spawner

log = Logger()
access_log = Logger(namespace="kapow.access")


class UserAPI(Resource):
    """
    :param routes: the live route table.
    :param handlers: where handlers are registered by id.
    :param spawner: starts the routes' processes.
    :param governor: times and ends them.
    :param admission: admits them (``admit(route)`` answers ``None``, a
        reason to refuse, or a Deferred of either; ``release(route)`` when an
        admitted handler exited); the governor by default.
    """

    isLeaf = True

    def __init__(
        self,
        routes: RouteTable,
        handlers: HandlerRegistry,
        spawner: Spawner,
        governor: Governor,
        admission: Any = None,
    ) -> None:
        super().__init__()
        self.routes = routes
        self.handlers = handlers
        self.spawner = spawner
        self.governor = governor
        self.admission = governor if admission is None else admission

    def render(self, request: Request) -> Any:
        path = unquote(request.path.decode("latin-1"), errors="surrogateescape")
        found = self.routes.match(request.method.decode("latin-1"), path)
        if found is None:
            return _plain(request, 404, b"Not Found\n")
        if found is METHOD_NOT_ALLOWED:
            request.setHeader(b"Allow", ", ".join(self.routes.methods_for(path)).encode())
            return _plain(request, 405, b"Method Not Allowed\n")
        verdict = self.admission.admit(found.route)
        if isinstance(verdict, Deferred):
            verdict.addCallback(self._admitted_later, request, found)
            return NOT_DONE_YET
        return self._start(request, found, verdict)

    def _admitted_later(self, refusal: str | None, request: Request, found: Match) -> None:
        if request._disconnected:  # type: ignore[attr-defined]
            if refusal is None:
                self.admission.release(found.route)
            return
        body = self._start(request, found, refusal)
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()

    def _start(self, request: Request, found: Match, refusal: str | None) -> Any:
        if refusal is not None:
            log.info(
                "refused {method} {path}: {why}",
                method=request.method.decode("latin-1"),
                path=unquote(request.path.decode("latin-1"), errors="surrogateescape"),
                why=refusal,
            )
            request.setHeader(b"Retry-After", b"1")
            return _plain(request, 503, b"Service Unavailable\n")
        handler = self.handlers.create(found.route, found.matches, request)
        request.kapow_handler_id = handler.id  # type: ignore[attr-defined]
        try:
            stdin = handler.stdin() if found.route.stdin else None
        except OSError as e:
            self._not_started(handler, str(e))
            return _plain(request, 500, b"Internal Server Error\n")
        self.governor.started(
            handler.id, found.route, None, lambda elapsed: self._timed_out(handler, elapsed)
        )
        handler.on_client_lost = lambda: self._client_lost(handler)
        spawned = self.spawner.start(
            handler.id, found.route.argv(), lambda status, sig: self._exited(handler, status, sig), stdin
        )
        if stdin is not None:  # the child has its own once the spawn is over
            spawned.addBoth(_closing, stdin)
        spawned.addCallbacks(
            lambda pgid: self._spawned(handler, pgid),
            lambda failure: self._spawn_failed(request, handler, failure),
        )
        return NOT_DONE_YET

    def _spawned(self, handler: Handler, pgid: int) -> None:
        log.debug("handler {id} started: pid {pid}", id=handler.id, pid=pgid)
        self.governor.spawned(handler.id, pgid)

    def _spawn_failed(self, request: Request, handler: Handler, failure: Any) -> None:
        self.governor.exited(handler.id)
        self._not_started(handler, failure.getErrorMessage())
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
        self.governor.terminate(handler.id)


def _closing(result: Any, fd: int) -> Any:
    """Close ``fd`` and pass ``result`` on."""
    os.close(fd)
    return result


def _plain(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return body


class UserRequest(Request):
    """
    A user request that is access-logged even when its connection is lost
    before the response completed (client gone, or a streamed response cut
    by a timeout); one never started is logged with status 499, "client
    closed request".
    """

    def connectionLost(self, reason: Any) -> None:
        unfinished = not self.finished and not self._disconnected
        super().connectionLost(reason)
        if unfinished and getattr(self, "site", None) is not None:
            if not self.startedWriting:
                self.code = 499
            self.site.log(self)


class UserSite(Site):
    """
    The user interface's site: bodies are never parsed as forms by
    twisted.web (handlers parse them lazily), and every request leaves one
    Common Log Format line with the handler id as identity (and, in a
    worker of ``--workers``, the worker's number as the event's ``worker``).

    :param worker: the number of the worker it serves in, if any.
    """

    requestFactory = UserRequest

    def __init__(self, resource: Any, worker: int | None = None, **kwargs: Any) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.worker = worker
        self._log_second: int | None = None
        self._log_date = ""

    def log(self, request: Request) -> None:
        now = self.reactor.seconds()
        if int(now) != self._log_second:  # one log date per second, as twisted.web keeps one
            self._log_second = int(now)
            self._log_date = http.datetimeToLogString(now)
        access_log.info("{line}", line=access_line(request, self._log_date), worker=self.worker)


def access_line(request: Request, date: str | None = None) -> str:
    """
    The Common Log Format line (with referrer and agent) for ``request``.

    :param date: the date field as :func:`twisted.web.http.datetimeToLogString`
        gives it; now by default.
    """
    host = getattr(request.getClientAddress(), "host", "-")
    identity = getattr(request, "kapow_handler_id", "-")
    return '{} {} - {} "{} {} {}" {} {} "{}" "{}"'.format(
        host,
        identity,
        date or http.datetimeToLogString(),
        _quoted(request.method),
        _quoted(request.uri),
        _quoted(request.clientproto),
        request.code,
        request.sentLength,
        _quoted(request.getHeader(b"referer")),
        _quoted(request.getHeader(b"user-agent")),
    )


def _quoted(value: bytes | None) -> str:
    """A field of the log line, escaped as twisted.web escapes it."""
    if not value:
        return "-"
    if value.isascii():
        text = value.decode("ascii")
        if text.isprintable() and not any(c in text for c in "\\\"'"):
            return text  # nothing to escape: the common case, without repr
    return http._escape(value)  # type: ignore[attr-defined]
