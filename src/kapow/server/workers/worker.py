"""
The worker's side of ``--workers N`` (docs/howto/scale-out.rst): a worker
is the server of ``--workers 1`` without the control API and the init
programs. It serves the user interface on the listening socket the main
process handed over, keeps the route table the main process sends, asks it
before starting a handler whose limit must hold across workers, and stops
when told to, or at once when the main process is gone.
"""

from __future__ import annotations

import json
import os
import socket
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReactorSocket,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import connectionDone
from twisted.internet.tcp import Port
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from kapow.core.metrics import Metrics, snapshot_parts
from kapow.core.routes import DEFAULT_QUEUE_TIMEOUT, Route, RouteTable, route_from_json
from kapow.core.runs import JobResult, RunRecord
from kapow.handlers.admission import Admission
from kapow.handlers.governor import Governor
from kapow.server.service import KapowService
from kapow.server.workers.messages import (
    BODY_PART,
    MAIN_FD,
    RECORDS_PART,
    ROUTES_PART,
    USER_FD,
    Admit,
    HandlerInfo,
    Handlers,
    JobBody,
    JobDone,
    JobResultPart,
    JobStarted,
    JobStatus,
    Kill,
    MetricsPart,
    Release,
    Reload,
    Routes,
    Running,
    RunRecords,
    Serve,
    Stop,
    TakeToken,
    Withdraw,
    handlers_page,
    headers_of,
    headers_text,
    link_factory,
)
from kapow.user.api import UserAPI

__all__ = [
    "GatedEndpoint",
    "HandedOverSocket",
    "MainAdmission",
    "MainProcessConnection",
    "WorkerLink",
    "accept_one_at_a_time",
]

log = Logger()


@implementer(IStreamServerEndpoint)
class HandedOverSocket:
    """
    The listening socket of the user interface that the main process handed
    over as descriptor ``fd``, behind ``haproxy:`` when ``--bind`` is;
    looked at only when listened on.

    :param reactor: adopts the socket.
    """

    def __init__(self, reactor: IReactorSocket, fd: int = USER_FD, proxied: bool = False) -> None:
        self.reactor = reactor
        self.fd = fd
        self.proxied = proxied

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        endpoint: IStreamServerEndpoint = AdoptedStreamServerEndpoint(
            self.reactor, self.fd, _socket_family(self.fd)
        )
        if self.proxied:
            endpoint = proxyEndpoint(endpoint)
        return endpoint.listen(factory)


def _socket_family(fd: int) -> int:
    """The address family of the socket ``fd``."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.family
    finally:
        sock.detach()


@implementer(IStreamServerEndpoint)
class GatedEndpoint:
    """
    A stream server endpoint that listens only once :meth:`open` was called:
    a worker accepts no connection before it has the route table. Its port
    then accepts one connection each time the socket is ready (see
    :func:`accept_one_at_a_time`).

    :param endpoint: the endpoint to listen on then.
    """

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self.endpoint = endpoint
        self._opened = False
        self._waiting: list[tuple[Deferred[IListeningPort], IProtocolFactory]] = []

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        if self._opened:
            return self.endpoint.listen(factory).addCallback(accept_one_at_a_time)
        d: Deferred[IListeningPort] = Deferred()
        self._waiting.append((d, factory))
        return d

    def open(self) -> Deferred[list[IListeningPort]]:
        """Listen now (and from now on at once); fires once listening."""
        self._opened = True
        waiting, self._waiting = self._waiting, []
        for d, factory in waiting:
            self.endpoint.listen(factory).addCallback(accept_one_at_a_time).chainDeferred(d)
        return gatherResults([d for d, _ in waiting])


def accept_one_at_a_time(port: IListeningPort) -> IListeningPort:
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
    if isinstance(port, Port):  # a TCP or UNIX port (not another endpoint's)
        tcp_port = port
        read = tcp_port.doRead

        def doRead() -> object:
            tcp_port.numberAccepts = 1  # Twisted raises it after each read that used it all
            return read()

        tcp_port.doRead = doRead  # type: ignore[method-assign]  # this port's reads, not every Port's
    return port


class MainAdmission(Admission):
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

    def _tell(self, command: type[amp.Command], **arguments: object) -> None:
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
    :param service: the worker's service, stopped when the main process says
        so (its :meth:`~kapow.server.service.KapowService.reload` on :class:`Reload`).
    :param user_endpoint: opened on :class:`Serve`.
    :param data_url: returns the URL of the worker's data listener.
    :param metrics: the worker's counts, if it keeps any.
    :ivar user_api: the worker's user interface, whose handlers the control
        API lists; set once it is made (it asks the main process through
        this link: :class:`MainAdmission`).
    :ivar control_url: the control API's URL, as :class:`Serve` said.
    """

    def __init__(
        self,
        number: int,
        *,
        routes: RouteTable,
        governor: Governor,
        service: KapowService,
        user_endpoint: GatedEndpoint,
        data_url: Callable[[], str],
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__()
        self.number = number
        self.routes = routes
        self.governor = governor
        self.service = service
        self.user_endpoint = user_endpoint
        self.data_url = data_url
        self.control_url = ""
        self.user_api: UserAPI | None = None
        self._parts: list[bytes] = []
        self.metrics = metrics
        self._metrics_parts: list[str] = [""]

    def handler_urls(self) -> tuple[str, str]:
        """The data and control URLs the worker's handlers get (once it serves)."""
        return self.data_url(), self.control_url

    def _user_api(self) -> UserAPI:
        if self.user_api is None:
            raise RuntimeError("the worker has no user interface")
        return self.user_api

    @Routes.responder
    def replace_routes(self, part: bytes, last: bool) -> dict[str, Any]:
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
    def serve(self, control_url: str) -> Deferred[dict[str, Any]]:
        self.control_url = control_url
        return self.user_endpoint.open().addCallback(lambda _: {"data_url": self.data_url()})

    @Running.responder
    def running(self) -> dict[str, Any]:
        return {"handlers": self.governor.running()}

    @Handlers.responder
    def handlers(self, after: str) -> dict[str, Any]:
        page, more = handlers_page(self._user_api().listing(), after)
        return {"handlers": page, "more": more}

    @HandlerInfo.responder
    def handler_info(self, handler_id: str) -> dict[str, Any]:
        info = self._user_api().handler_info(handler_id)
        return {} if info is None else {"handler": json.dumps(info).encode()}

    @Kill.responder
    def kill(self, handler_id: str) -> dict[str, Any]:
        return {"killed": self._user_api().kill(handler_id)}

    @MetricsPart.responder
    def metrics_part(self, part: int) -> dict[str, Any]:
        if part == 0:
            self._metrics_parts = [""] if self.metrics is None else snapshot_parts(self.metrics, ROUTES_PART)
        parts = self._metrics_parts
        return {"text": parts[part] if part < len(parts) else "", "parts": len(parts)}

    @Reload.responder
    def reload_files(self) -> dict[str, Any]:
        self.service.reload()
        return {}

    @Stop.responder
    def stop(self, now: bool) -> dict[str, Any]:
        if now:
            log.info("worker {n}: told to end its handlers now", n=self.number)
            self.service.stop_now()
        else:
            log.info("worker {n}: told to stop gracefully", n=self.number)
            self.service.stop_gracefully()
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if not self.service.stop_requested:
            log.warn("worker {n}: lost the main process: ending its handlers and stopping", n=self.number)
        self.service.stop_now()


class MainProcessConnection(Service):
    """
    Connects a worker's :class:`WorkerLink` to the main process when it
    starts: adopts its end of their ``socketpair``, the descriptor ``fd``,
    which is closed then (the reactor keeps its own copy).

    :param reactor: adopts the connection.
    """

    name = "main-process"

    def __init__(self, reactor: IReactorSocket, link: WorkerLink, fd: int = MAIN_FD) -> None:
        self.reactor = reactor
        self.link = link
        self.fd = fd

    def startService(self) -> None:
        super().startService()
        self.reactor.adoptStreamConnection(self.fd, socket.AF_UNIX, link_factory(self.link))
        os.close(self.fd)


class RecordRelay(Service):
    """
    Sends the run records of a worker's handlers to the main process, which
    alone writes the history: in batches, each within :attr:`delay` seconds
    of its first record, and what is left when the worker stops.

    :param clock: times the batches.
    :param link: the connection to the main process.
    """

    name = "history-relay"
    #: seconds a record may wait for others to go with it
    delay = 0.2

    def __init__(self, clock: IReactorTime, link: amp.AMP) -> None:
        self.clock = clock
        self.link = link
        self._batch: list[str] = []
        self._size = 0
        self._later: IDelayedCall | None = None

    def add(self, record: RunRecord) -> None:
        """Send ``record`` with the next batch."""
        text = json.dumps(record, separators=(",", ":"))
        if self._size + len(text) + 2 > RECORDS_PART:
            self.flush()
        self._batch.append(text)
        self._size += len(text) + 1
        if self._later is None:
            self._later = self.clock.callLater(self.delay, self.flush)

    def flush(self) -> None:
        """Send what waits now."""
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None
        batch, self._batch, self._size = self._batch, [], 0
        if batch:
            try:
                self.link.callRemote(RunRecords, records="[" + ",".join(batch) + "]")
            except ConnectionLost:
                log.warn("lost {n} run records: the main process is gone", n=len(batch))

    def stopService(self) -> None:
        self.flush()
        super().stopService()


class MainJobs:
    """
    A worker's jobs, kept by the main process (a
    :class:`kapow.user.jobs.JobBook`): told of each job as it runs, and
    asked when a client wants to know, whichever worker started the job.

    :param link: the connection to the main process.
    """

    def __init__(self, link: amp.AMP) -> None:
        self.link = link

    def started(self, record: RunRecord, state: str) -> None:
        self._tell(JobStarted, record=json.dumps(record), state=state)

    def done(self, record: RunRecord, result: JobResult) -> None:
        body = result.body
        for start in range(0, len(body), BODY_PART):
            self._tell(JobBody, id=record["id"], part=body[start : start + BODY_PART])
        self._tell(
            JobDone,
            record=json.dumps(record),
            status=result.status,
            reason=result.reason,
            headers=headers_text(result.headers),
            truncated=result.truncated,
        )

    def status(self, job_id: str) -> Deferred[tuple[str, RunRecord] | None]:
        def found(answer: dict[str, Any]) -> tuple[str, RunRecord] | None:
            return (answer["state"], json.loads(answer["record"])) if answer["found"] else None

        return self.link.callRemote(JobStatus, id=job_id).addCallback(found)

    @inlineCallbacks
    def result(self, job_id: str) -> Generator[Deferred[Any], Any, JobResult | None]:
        first = yield self.link.callRemote(JobResultPart, id=job_id, part=0)
        if not first["found"]:
            return None
        body = [first["body"]]
        for part in range(1, first["parts"]):
            answer = yield self.link.callRemote(JobResultPart, id=job_id, part=part)
            body.append(answer["body"])
        return JobResult(
            first["status"], first["reason"], headers_of(first["headers"]), b"".join(body), first["truncated"]
        )

    def _tell(self, command: type[amp.Command], **arguments: object) -> None:
        try:
            self.link.callRemote(command, **arguments)
        except ConnectionLost:
            log.warn("the main process is gone: a job's news is lost")


class MainRates:
    """
    A worker's rate limits, decided by the main process (a
    :class:`kapow.handlers.rates.RateLimits`): one bucket per key across
    every worker.

    A request that may go on costs a question to the main process. One
    that may not is answered here when the answer is already known: once
    the main process said a bucket is empty until a time, no worker can
    fill it sooner (tokens only come with time), so until then this worker
    refuses that key without asking: a flood of refused requests costs no
    round trip.

    :param link: the connection to the main process.
    :param clock: the reactor's time.
    :param max_keys: empty buckets remembered at most (the oldest forgotten first).
    """

    def __init__(self, link: amp.AMP, clock: IReactorTime, max_keys: int = 100_000) -> None:
        self.link = link
        self.clock = clock
        self.max_keys = max_keys
        self._empty: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def take(
        self, route_id: str, rate: Mapping[str, object], key: str
    ) -> float | Deferred[float | None] | None:
        text = json.dumps(rate, sort_keys=True)
        bucket = (route_id, text, key)
        until = self._empty.get(bucket)
        now = self.clock.seconds()
        if until is not None:
            if now < until:
                return until - now
            del self._empty[bucket]
        asked = self.link.callRemote(TakeToken, route_id=route_id, rate=text, key=key)
        return asked.addCallback(self._answered, bucket, now)

    def _answered(self, answer: dict[str, Any], bucket: tuple[str, str, str], asked: float) -> float | None:
        wait: float = answer["wait"]
        if not wait:
            return None
        self._empty[bucket] = asked + wait
        self._empty.move_to_end(bucket)
        while len(self._empty) > self.max_keys:
            self._empty.popitem(last=False)
        return wait
