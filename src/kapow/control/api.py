"""
The control API (SPEC.md §2, §8): list, add, insert, get and remove routes;
list, show and kill the live handlers.

It is served only behind pinned mutual TLS (see :mod:`kapow.web.tls`); nothing in
this module knows about TLS.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from kapow.core.routes import InvalidRoute, Route, RouteTable, route_from_json
from kapow.web.errors import JSONError, install_json_errors, json_body

log = Logger()


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
    :param handlers: the live handlers: ``listing()`` (a list of handlers
        as SPEC §8 shows them), ``handler_info(id)`` (one, or ``None``) and
        ``kill(id)`` (whether there was one), each answering directly or
        with a Deferred.
    """

    routes: RouteTable
    new_id: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))
    stats: Callable[[], Any] = field(default=dict)
    publish: Callable[[], Any] = field(default=lambda: None)
    handlers: Any = field(default_factory=lambda: NoHandlers())

    app = Klein()

    def resource(self) -> Any:
        """The Twisted resource serving this API."""
        return self.app.resource()

    @app.route("/routes", methods=["GET"])
    def list_routes(self, request: IRequest) -> bytes:
        return json_body(request, 200, self.routes.listing())

    @app.route("/routes", methods=["POST"])
    def append_route(self, request: IRequest) -> bytes:
        route = self._route_from_request(request)
        index = self.routes.append(route)
        log.info("route added: {route}", route=route.to_json(index))
        return self._published(lambda: json_body(request, 201, route.to_json(index)))

    @app.route("/routes", methods=["PUT"])
    def insert_route(self, request: IRequest) -> bytes:
        data = _read_json(request)
        wanted = data.get("index") if isinstance(data, dict) else None
        if wanted is None:
            wanted = 0
        if type(wanted) is not int or wanted < 0:
            raise JSONError(422, "Invalid Route")
        route = self._route_from_json(data)
        index = self.routes.insert(route, wanted)
        log.info("route inserted: {route}", route=route.to_json(index))
        return self._published(lambda: json_body(request, 201, route.to_json(index)))

    @app.route("/routes/<string:route_id>", methods=["GET"])
    def get_route(self, request: IRequest, route_id: str) -> bytes:
        try:
            index, route = self.routes.get(route_id)
        except KeyError:
            raise JSONError(404, "Route Not Found") from None
        return json_body(request, 200, route.to_json(index))

    @app.route("/routes/<string:route_id>", methods=["DELETE"])
    def delete_route(self, request: IRequest, route_id: str) -> bytes:
        try:
            route = self.routes.remove(route_id)
        except KeyError:
            raise JSONError(404, "Route Not Found") from None
        log.info("route removed: {id}", id=route.id)
        request.setResponseCode(204)
        return self._published(lambda: b"")

    @app.route("/handlers", methods=["GET"])
    def list_handlers(self, request: IRequest) -> Deferred[bytes]:
        return maybeDeferred(self.handlers.listing).addCallback(lambda found: json_body(request, 200, found))

    @app.route("/handlers/<string:handler_id>", methods=["GET"])
    def get_handler(self, request: IRequest, handler_id: str) -> Deferred[bytes]:
        def answer(info: dict | None) -> bytes:
            if info is None:
                raise JSONError(404, "Handler Not Found")
            return json_body(request, 200, info)

        return maybeDeferred(self.handlers.handler_info, handler_id).addCallback(answer)

    @app.route("/handlers/<string:handler_id>", methods=["DELETE"])
    def kill_handler(self, request: IRequest, handler_id: str) -> Deferred[bytes]:
        def answer(killed: bool) -> bytes:
            if not killed:
                raise JSONError(404, "Handler Not Found")
            request.setResponseCode(204)
            return b""

        return maybeDeferred(self.handlers.kill, handler_id).addCallback(answer)

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> Any:
        routes = len(self.routes)
        stats = self.stats()
        if isinstance(stats, Deferred):
            return stats.addCallback(
                lambda found: json_body(request, 200, {"status": "ok", "routes": routes, **found})
            )
        return json_body(request, 200, {"status": "ok", "routes": routes, **stats})

    def _published(self, answer: Callable[[], bytes]) -> Any:
        """``answer()`` once the change is published (at once when that is immediate)."""
        published = self.publish()
        if isinstance(published, Deferred):
            return published.addCallback(lambda _: answer())
        return answer()

    def _route_from_request(self, request: IRequest) -> Route:
        return self._route_from_json(_read_json(request))

    def _route_from_json(self, data: Any) -> Route:
        try:
            return route_from_json(data, self.new_id())
        except InvalidRoute as e:
            log.info("refused route: {why}", why=str(e))
            raise JSONError(422, "Invalid Route") from None

    install_json_errors(app)


class NoHandlers:
    """The handlers of a control API that has none to show."""

    def listing(self) -> list[dict]:
        return []

    def handler_info(self, handler_id: str) -> dict | None:
        return None

    def kill(self, handler_id: str) -> bool:
        return False


def _read_json(request: IRequest) -> Any:
    try:
        return json.loads(request.content.read())
    except (ValueError, UnicodeDecodeError):
        raise JSONError(400, "Malformed JSON") from None
