"""
The worker's side of ``--workers N``: a worker is the server of
``--workers 1`` without the control API and the init programs. It serves the
user interface on the listening socket the main process handed over, keeps
the route table the main process sends, asks it before starting a handler
whose limit must hold across workers, and stops when told to, or at once when
the main process is gone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from kapow.core.metrics import snapshot_parts
from kapow.core.routes import DEFAULT_QUEUE_TIMEOUT, Route, RouteTable, route_from_json
from kapow.handlers.governor import Governor
from kapow.server.workers.messages import (
    ROUTES_PART,
    Admit,
    HandlerInfo,
    Handlers,
    Kill,
    MetricsPart,
    Release,
    Reload,
    Routes,
    Running,
    Serve,
    Stop,
    Withdraw,
    handlers_page,
)

log = Logger()


class GatedEndpoint:
    """
    A stream server endpoint that listens only once :meth:`open` was called:
    a worker accepts no connection before it has the route table. Its port
    then accepts one connection each time the socket is ready (see
    :func:`accept_one_at_a_time`).

    :param endpoint: the endpoint to listen on then.
    """

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint
        self._opened = False
        self._waiting: list[tuple[Deferred[Any], Any]] = []

    def listen(self, factory: Any) -> Deferred[Any]:
        if self._opened:
            return self.endpoint.listen(factory).addCallback(accept_one_at_a_time)
        d: Deferred[Any] = Deferred()
        self._waiting.append((d, factory))
        return d

    def open(self) -> Deferred[Any]:
        """Listen now (and from now on at once); fires once listening."""
        self._opened = True
        waiting, self._waiting = self._waiting, []
        for d, factory in waiting:
            self.endpoint.listen(factory).addCallback(accept_one_at_a_time).chainDeferred(d)
        return gatherResults([d for d, _ in waiting])


def accept_one_at_a_time(port: Any) -> Any:
    """
    Make a listening ``port`` that workers share accept one connection each
    time its socket is ready, instead of all that are waiting: every worker
    is woken by a new connection, so the connections that arrive together go
    to the workers in turn, and to an idle one rather than to one busy
    starting a handler. (Twisted accepts up to a hundred at once, so one
    worker took every connection of a client that opens them together, and
    served them all alone while the others idled.)

    :return: ``port``.
    """
    if hasattr(port, "numberAccepts"):  # a TCP or UNIX port (not another endpoint's)
        read = port.doRead

        def doRead() -> Any:
            port.numberAccepts = 1  # Twisted raises it after each read that used it all
            return read()

        port.doRead = doRead
    return port


class MainAdmission:
    """
    Admission of a worker's handlers: the worker's own governor first (is it
    stopping?), then the main process, but only when a limit that must hold
    across workers applies (the route's ``max_concurrency``, ``--max-handlers``).
    A request the main process keeps in a queue can be withdrawn by
    cancelling the Deferred :meth:`admit` gave; a graceful stop refuses
    every request still waiting.

    :param governor: the worker's governor.
    :param max_handlers: the server's ``--max-handlers``.
    :param link: the connection to the main process.
    """

    def __init__(self, governor: Governor, max_handlers: int | None, link: amp.AMP) -> None:
        self.governor = governor
        self.max_handlers = max_handlers
        self.link = link
        self._tickets = 0
        self._waiting: dict[int, Deferred[str | None]] = {}
        governor.on_stopping.append(self._refuse_waiting)

    def _limited(self, route: Route) -> bool:
        return route.max_concurrency is not None or self.max_handlers is not None

    def admit(self, route: Route) -> str | Deferred[str | None] | None:
        """``None`` if a handler may start, else why not; a Deferred of that when the main process decides."""
        refusal = self.governor.admit(route)
        if refusal is not None or not self._limited(route):
            return refusal
        self._tickets += 1
        ticket = self._tickets
        answer: Deferred[str | None] = Deferred(lambda d: self._withdraw(ticket))
        self._waiting[ticket] = answer
        arguments: dict[str, Any] = {"route_id": route.id, "limit": route.max_concurrency, "ticket": ticket}
        if route.queue:
            arguments["queue"] = route.queue
            arguments["queue_timeout"] = (
                route.queue_timeout if route.queue_timeout is not None else DEFAULT_QUEUE_TIMEOUT
            )

        def lost(failure: Failure) -> str:
            log.warn("admission by the main process failed: {why}", why=failure.getErrorMessage())
            return "the main process does not answer"

        def answered(refusal: str | None) -> None:
            if self._waiting.pop(ticket, None) is not None:
                answer.callback(refusal)
            elif refusal is None:  # withdrawn, but the slot came first
                self.release(route)

        maybeDeferred(self.link.callRemote, Admit, **arguments).addCallbacks(
            lambda found: found.get("refusal"), lost
        ).addCallback(answered)
        return answer

    def _withdraw(self, ticket: int) -> None:
        if self._waiting.pop(ticket, None) is not None:
            self._tell(Withdraw, ticket=ticket)

    def _refuse_waiting(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for ticket, answer in waiting.items():
            self._tell(Withdraw, ticket=ticket)
            answer.callback("the server is stopping")

    def release(self, route: Route) -> None:
        """A handler that :meth:`admit` let start has exited."""
        if self._limited(route):
            self._tell(Release, route_id=route.id, limited=route.max_concurrency is not None)

    def _tell(self, command: type[amp.Command], **arguments: Any) -> None:
        try:
            self.link.callRemote(command, **arguments)
        except ConnectionLost:
            pass  # the main process is gone, and with it what it counted


class WorkerLink(amp.AMP):
    """
    The worker's end of its connection to the main process.

    :param number: the worker's number, for logs.
    :param routes: the worker's route table, replaced by each :class:`Routes`.
    :param governor: the worker's governor.
    :param service: the worker's :class:`kapow.server.service.KapowService`.
    :param user_endpoint: opened on :class:`Serve`.
    :param data_url: returns the URL of the worker's data listener.
    :param metrics: the worker's counts (:class:`kapow.core.metrics.Metrics`), if it keeps any.
    :param reload: reads certificates and auth files again.
    """

    def __init__(
        self,
        number: int,
        routes: RouteTable,
        governor: Governor,
        service: Any,
        user_endpoint: GatedEndpoint,
        data_url: Callable[[], str],
        metrics: Any = None,
        reload: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__()
        self.number = number
        self.routes = routes
        self.governor = governor
        self.service = service
        self.user_endpoint = user_endpoint
        self.data_url = data_url
        self.control_url = ""
        #: the worker's user interface (:class:`kapow.user.api.UserAPI`), for the control API
        self.user_api: Any = None
        self._parts: list[bytes] = []
        self.metrics = metrics
        self.reload = reload
        self._metrics_parts: list[str] = [""]

    @Routes.responder
    def replace_routes(self, part: bytes, last: bool) -> dict:
        self._parts.append(part)
        if last:
            text, self._parts = b"".join(self._parts), []
            # a route whose auth files cannot be read here refuses its requests: never the whole table
            routes = [route_from_json(data, data["id"], strict_auth=False) for data in json.loads(text)]
            for route in routes:
                if route.guard is not None and not route.guard.loaded:
                    log.error(
                        "worker {n}: route {id}: its auth files cannot be read", n=self.number, id=route.id
                    )
            self.routes.replace(routes)
        return {}

    @Serve.responder
    def serve(self, control_url: str) -> Deferred[dict]:
        self.control_url = control_url
        return self.user_endpoint.open().addCallback(lambda _: {"data_url": self.data_url()})

    @Running.responder
    def running(self) -> dict:
        return {"handlers": self.governor.running()}

    @Handlers.responder
    def handlers(self, after: str) -> dict:
        page, more = handlers_page(self.user_api.listing(), after)
        return {"handlers": page, "more": more}

    @HandlerInfo.responder
    def handler_info(self, handler_id: str) -> dict:
        info = self.user_api.handler_info(handler_id)
        return {} if info is None else {"handler": json.dumps(info).encode()}

    @Kill.responder
    def kill(self, handler_id: str) -> dict:
        return {"killed": self.user_api.kill(handler_id)}

    @MetricsPart.responder
    def metrics_part(self, part: int) -> dict:
        if part == 0:
            self._metrics_parts = [""] if self.metrics is None else snapshot_parts(self.metrics, ROUTES_PART)
        parts = self._metrics_parts
        return {"text": parts[part] if part < len(parts) else "", "parts": len(parts)}

    @Reload.responder
    def reload_files(self) -> dict:
        self.reload()
        return {}

    @Stop.responder
    def stop(self, now: bool) -> dict:
        if now:
            log.info("worker {n}: told to end its handlers now", n=self.number)
            self.service.stop_now()
        else:
            log.info("worker {n}: told to stop gracefully", n=self.number)
            self.service.stop_gracefully()
        return {}

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if not self.service.stop_requested:
            log.warn("worker {n}: lost the main process: ending its handlers and stopping", n=self.number)
        self.service.stop_now()
