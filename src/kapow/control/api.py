"""
The control API (docs/reference/control-api.rst): list, add, insert, get
and remove routes; list, show and kill the live handlers; query the run
history.

It is served only behind pinned mutual TLS (see :mod:`kapow.web.tls`); nothing in
this module knows about TLS.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, TypeVar, cast

from klein import Klein
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from kapow.core.messages import quoted
from kapow.core.routes import InvalidRoute, Route, RouteTable, route_from_json
from kapow.core.runs import HistoryQuery, InvalidQuery, RunRecord, parse_query, shown
from kapow.handlers.listing import HandlerShown, HandlersListing
from kapow.web.errors import JSONError, install_json_errors, json_body, json_resource

__all__ = ["ControlAPI", "History", "NoHandlers", "NoHistory", "Stats"]

log = Logger()

#: The fields ``/health`` adds to ``status`` and ``routes``.
Stats = dict[str, Any]
_T = TypeVar("_T")


class NoHandlers:
    """The handlers of a control API that has none to show."""

    def listing(self) -> list[HandlerShown]:
        return []

    def handler_info(self, handler_id: str) -> HandlerShown | None:
        return None

    def kill(self, handler_id: str) -> bool:
        return False


class History(Protocol):
    """The run history the control API reads (:class:`kapow.history.writer.HistoryWriter`)."""

    #: whether its database can be reached now
    available: bool

    def query(self, query: HistoryQuery) -> Deferred[list[RunRecord]]:
        """The records ``query`` finds, newest first."""

    def get(self, run_id: str) -> Deferred[RunRecord | None]:
        """One record, or ``None``."""


class NoHistory:
    """The history of a server that keeps none (``--history off``)."""

    available = True

    def query(self, query: HistoryQuery) -> Deferred[list[RunRecord]]:
        return succeed([])

    def get(self, run_id: str) -> Deferred[RunRecord | None]:
        return succeed(None)


@dataclass
class ControlAPI:
    """
    The control interface as a Klein application.

    :param routes: the live route table this API changes.
    :param new_id: makes route ids (random UUID4 text by default).
    :param stats: optional callable returning extra fields for ``/health``
        (or a Deferred of them).
    :param publish: called after every change of the table; the change is
        answered once what it returns (``None`` or a Deferred) is done.
    :param handlers: the live handlers, listed, shown and killed on
        ``/handlers``; none by default.
    :param history: the run history of ``/history``; none by default.
    """

    routes: RouteTable
    new_id: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))
    stats: Callable[[], Stats | Deferred[Stats]] = field(default=dict)
    publish: Callable[[], Deferred[Any] | None] = field(default=lambda: None)
    handlers: HandlersListing = field(default_factory=NoHandlers)
    history: History = field(default_factory=NoHistory)

    app = Klein()

    def resource(self) -> IResource:
        """The Twisted resource serving this API."""
        return json_resource(
            self.app, JSONError(404, "Not Found", "the path or host is not UTF-8 once percent-decoded")
        )

    @app.route("/routes", methods=["GET"])
    def list_routes(self, request: IRequest) -> bytes:
        return json_body(request, 200, self.routes.listing())

    @app.route("/routes", methods=["POST"])
    def append_route(self, request: IRequest) -> bytes | Deferred[bytes]:
        route = self._route_from_request(request)
        index = self.routes.append(route)
        log.info("route added: {route}", route=json.dumps(route.to_json(index)))
        return self._published(lambda: json_body(request, 201, route.to_json(index)))

    @app.route("/routes", methods=["PUT"])
    def insert_route(self, request: IRequest) -> bytes | Deferred[bytes]:
        data = _read_json(request)
        wanted = data.get("index") if isinstance(data, dict) else None
        if wanted is None:
            wanted = 0
        if type(wanted) is not int or wanted < 0:
            raise JSONError(422, "Invalid Route", f"index must be a whole number >= 0, not {quoted(wanted)}")
        route = self._route_from_json(data)
        index = self.routes.insert(route, wanted)
        log.info("route inserted: {route}", route=json.dumps(route.to_json(index)))
        return self._published(lambda: json_body(request, 201, route.to_json(index)))

    @app.route("/routes/<string:route_id>", methods=["GET"])
    def get_route(self, request: IRequest, route_id: str) -> bytes:
        try:
            index, route = self.routes.get(route_id)
        except KeyError:
            raise JSONError(404, "Route Not Found") from None
        return json_body(request, 200, route.to_json(index))

    @app.route("/routes/<string:route_id>", methods=["DELETE"])
    def delete_route(self, request: IRequest, route_id: str) -> bytes | Deferred[bytes]:
        try:
            route = self.routes.remove(route_id)
        except KeyError:
            raise JSONError(404, "Route Not Found") from None
        log.info("route removed: {id}", id=route.id)
        request.setResponseCode(204)
        return self._published(lambda: b"")

    @app.route("/handlers", methods=["GET"])
    def list_handlers(self, request: IRequest) -> Deferred[bytes]:
        return _answer(self.handlers.listing).addCallback(lambda found: json_body(request, 200, found))

    @app.route("/handlers/<string:handler_id>", methods=["GET"])
    def get_handler(self, request: IRequest, handler_id: str) -> Deferred[bytes]:
        def answer(info: HandlerShown | None) -> bytes:
            if info is None:
                raise JSONError(404, "Handler Not Found")
            return json_body(request, 200, info)

        return _answer(self.handlers.handler_info, handler_id).addCallback(answer)

    @app.route("/handlers/<string:handler_id>", methods=["DELETE"])
    def kill_handler(self, request: IRequest, handler_id: str) -> Deferred[bytes]:
        def answer(killed: bool) -> bytes:
            if not killed:
                raise JSONError(404, "Handler Not Found")
            request.setResponseCode(204)
            return b""

        return _answer(self.handlers.kill, handler_id).addCallback(answer)

    @app.route("/history", methods=["GET"])
    def list_history(self, request: IRequest) -> Deferred[bytes]:
        args = {name.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in values]
                for name, values in (request.args or {}).items()}  # fmt: skip
        try:
            query = parse_query(args)
        except InvalidQuery as e:
            raise JSONError(400, "Invalid Query", str(e)) from None
        asked = self.history.query(query).addErrback(_history_unavailable)
        return asked.addCallback(
            lambda found: json_body(
                request, 200, [shown(record) for record in found if not _unfinished(record)]
            )
        )

    @app.route("/history/<string:run_id>", methods=["GET"])
    def get_run(self, request: IRequest, run_id: str) -> Deferred[bytes]:
        def answer(record: RunRecord | None) -> bytes:
            if record is None or _unfinished(record):
                raise JSONError(404, "Run Not Found")
            return json_body(request, 200, shown(record))

        return self.history.get(run_id).addErrback(_history_unavailable).addCallback(answer)

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes | Deferred[bytes]:
        health: dict[str, Any] = {"status": "ok", "routes": len(self.routes)}
        if not self.history.available:
            health["history"] = "unavailable"
        stats = self.stats()
        if isinstance(stats, Deferred):
            return stats.addCallback(lambda found: json_body(request, 200, {**health, **found}))
        return json_body(request, 200, {**health, **stats})

    def _published(self, answer: Callable[[], bytes]) -> bytes | Deferred[bytes]:
        """``answer()`` once the change is published (at once when that is immediate)."""
        published = self.publish()
        if isinstance(published, Deferred):
            return published.addCallback(lambda _: answer())
        return answer()

    def _route_from_request(self, request: IRequest) -> Route:
        return self._route_from_json(_read_json(request))

    def _route_from_json(self, data: object) -> Route:
        try:
            return route_from_json(data, self.new_id())
        except InvalidRoute as e:
            raise JSONError(422, "Invalid Route", str(e)) from None

    install_json_errors(app)


def _answer(call: Callable[..., _T | Deferred[_T]], *args: str) -> Deferred[_T]:
    """
    What ``call(*args)`` answers, at once or with a Deferred, as a Deferred
    (its exceptions as failures).
    """
    # maybeDeferred waits for a Deferred that call returns; its types cannot say so
    return cast("Deferred[_T]", maybeDeferred(call, *args))


def _history_unavailable(failure: Failure) -> NoReturn:
    """The history's database cannot be read now (a cluster's is down): 503."""
    log.warn("cannot read the run history: {why}", why=failure.getErrorMessage())
    raise JSONError(503, "History Unavailable")


def _unfinished(record: RunRecord) -> bool:
    """Whether ``record`` is of a job that has not ended (kept for a cluster's servers, not a run yet)."""
    return "_state" in record


def _read_json(request: IRequest) -> object:
    """The JSON value of ``request``'s body; 400 ``Malformed JSON`` saying where it is not JSON."""
    body = request.content.read()
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        why = "the body is empty, not JSON" if not body else _parser_says(e)
    except UnicodeDecodeError as e:
        why = f"the body is not {e.encoding} text: {e.reason} at byte {e.start}"
    except ValueError as e:  # a number too long to convert; what follows ";" is advice for Python programmers
        why = f"invalid JSON: {str(e).partition(';')[0]}"
    except RecursionError:
        why = "the body nests lists or objects deeper than the JSON parser goes"
    raise JSONError(400, "Malformed JSON", why)


def _parser_says(e: json.JSONDecodeError) -> str:
    """What the JSON parser said, with where: ``invalid JSON at line 1, column 2 (char 1): expecting ...``."""
    return f"invalid JSON at line {e.lineno}, column {e.colno} (char {e.pos}): {e.msg[:1].lower()}{e.msg[1:]}"
