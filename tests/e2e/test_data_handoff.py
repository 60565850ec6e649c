"""
The data API of ``--data-bind`` under ``--workers``, on loopback: a real
listener of :class:`HandOffFactory` hands each connection to a real data
API site that adopts it as a worker does, from the socket a worker reads
(here in the same process), with handlers of
in-memory user requests. What a client must see: the worker's answer as it
gave it (every method, status code and reason phrase), on any client
(keeping its connection or not, sending its request line in pieces), and a
clear refusal where no worker serves the handler.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from kapow.data.api import DataAPI
from kapow.data.handoff import (
    LINE_MOST,
    HandedConnections,
    HandOff,
    HandOffFactory,
    Taker,
    adopter,
    handler_id_in,
    sender,
)
from kapow.handlers.handler import HandlerRegistry
from kapow.web.connections import Timeouts, guarded_protocol
from tests.support.processes import until
from tests.support.user_connection import ROUTE, UserConnection, header_values, http_request

GONE = "gone" * 8
#: a handler whose worker takes no more connections for now
BUSY = "b" * 32


class _Raw(Protocol):
    """
    A client that sends ``pieces`` a moment apart (and then, if it ``leaves``,
    closes its end) and keeps all it gets until the connection closes.
    """

    def __init__(self, pieces: list[bytes], leaves: bool) -> None:
        self.pieces = pieces
        self.leaves = leaves
        self.received = b""
        self.done: Deferred[bytes] = Deferred()
        self._later: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._next()

    def _next(self) -> None:
        assert self.transport is not None  # connected
        if self.pieces:
            self.transport.write(self.pieces.pop(0))
        if self.pieces:
            self._later = reactor.callLater(0.05, self._next)
        elif self.leaves:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._later is not None and self._later.active():
            self._later.cancel()  # closed by the server before all was sent
        self.done.callback(self.received)


class _Keeping(HandOffFactory):
    """Keeps each connection's :class:`HandOff`, to see its end."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.made: list[HandOff] = []

    def buildProtocol(self, addr: IAddress | None) -> HandOff:
        protocol = super().buildProtocol(addr)
        self.made.append(protocol)
        return protocol


class HandOffTests(TestCase):
    def setUp(self) -> None:
        self.registry = HandlerRegistry()
        site = Site(DataAPI(self.registry).resource())
        # short: the guard of the data API's connections checks them every 0.1 s, until none is open
        timeouts = Timeouts(header=0.4, idle=0.4, body_rate=1024, idle_on_loopback=False)
        site.protocol = guarded_protocol(timeouts, reactor, tls=False)  # type: ignore[assignment]  # as a listener sets it
        guard = site.protocol().guard
        # the worker's end, here in the same process: the main's sender and the worker's reader
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.addCleanup(ours.close)
        worker = HandedConnections(reactor, theirs.detach(), adopter(reactor, site))
        worker.startService()
        self.addCleanup(worker.stopService)
        take = sender(ours)
        closed, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        closed.close()
        self.asked: list[str] = []
        # the guard stops checking at its first check after the last connection closed
        self.addCleanup(lambda: ensureDeferred(until(lambda: guard._check is None, what="the guard's stop")))

        def choose(handler_id: str) -> Taker | None:
            self.asked.append(handler_id)
            if handler_id == GONE:
                return None
            return sender(closed) if handler_id == BUSY else take

        factory = _Keeping(choose, reactor, timeouts)
        # this process's copy of each connection is closed once it was handed over, or refused
        self.addCleanup(
            lambda: ensureDeferred(
                until(
                    lambda: not any(p.transport.connected for p in factory.made), what="the connections' end"
                )
            )
        )
        front = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(front.stopListening)
        self.port = front.getHost().port
        self.url = f"http://127.0.0.1:{self.port}/handlers/"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    async def call(
        self, method: str, path: str, data: bytes | None = None, pool: HTTPConnectionPool | None = None
    ) -> tuple[int, bytes, Any]:
        response = await treq.request(method, self.url + path, data=data, pool=pool or self.pool)
        body = await response.content()
        return response.code, response.phrase, json.loads(body) if body else None

    def raw(self, *pieces: bytes, leaves: bool = False) -> Deferred[bytes]:
        client = _Raw(list(pieces), leaves)
        factory = ClientFactory.forProtocol(lambda: client)
        reactor.connectTCP("127.0.0.1", self.port, factory)
        return client.done

    def handler(self) -> tuple[UserConnection, str]:
        connection = UserConnection(http_request())
        return connection, self.registry.create(ROUTE, {}, connection.request).id

    async def test_every_method_and_reason_phrase_pass_through(self) -> None:
        connection, handler_id = self.handler()
        for value in (b"1", b"2"):
            self.assertEqual((await self.call("PUT", handler_id + "/response/headers/X-A", value))[0], 200)
        self.assertEqual(await self.call("DELETE", handler_id + "/response/headers/X-A"), (200, b"OK", None))
        self.assertEqual(
            await self.call("PUT", handler_id + "/response/reason", b"a\nb"),
            (
                400,
                b"Invalid Reason Phrase",
                {
                    "reason": "Invalid Reason Phrase",
                    "detail": "the reason phrase holds the control character '\\n' at byte 1",
                },
            ),
        )
        self.assertEqual(
            await self.call("GET", handler_id + "/request/headers/%ff"),
            (
                400,
                b"Invalid Resource Path",
                {"reason": "Invalid Resource Path", "detail": "the path is not UTF-8 once percent-decoded"},
            ),
        )
        self.assertEqual((await self.call("PUT", handler_id + "/response/end", b""))[0], 200)
        self.assertEqual(
            await self.call("DELETE", handler_id + "/response/cookies/c"),
            (409, b"Response Already Ended", {"reason": "Response Already Ended"}),
        )
        code, headers, _ = connection.response()
        self.assertEqual((code, header_values(headers, b"X-A")), (200, []))
        self.assertEqual(set(self.asked), {handler_id})

    async def test_a_handler_no_worker_serves_is_not_found(self) -> None:
        self.assertEqual(
            await self.call("DELETE", GONE + "/response/headers/X-A"),
            (404, b"Handler ID Not Found", {"reason": "Handler ID Not Found"}),
        )
        answer = await self.raw(http_request(b"GET", b"/handlers/" + GONE.encode() + b"/request/method"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 404 Handler ID Not Found\r\n"), answer)

    async def test_a_worker_that_cannot_take_it_now(self) -> None:
        self.assertEqual(
            await self.call("GET", BUSY + "/request/method"),
            (503, b"Service Unavailable", {"reason": "Service Unavailable"}),
        )

    async def test_a_kept_connection_serves_one_call_and_the_client_opens_another(self) -> None:
        _, handler_id = self.handler()
        keeping = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(keeping.closeCachedConnections)
        response = await treq.get(self.url + handler_id + "/request/method", pool=keeping)
        self.assertEqual(await response.content(), b"GET")
        for _ in range(3):
            response = await treq.get(self.url + handler_id + "/request/path", pool=keeping)
            self.assertEqual((response.code, await response.content()), (200, b"/x"))
        # a second request sent on the same connection is not answered by the
        # worker that took the first: the connection ends after the first answer
        two = http_request(b"GET", b"/handlers/" + handler_id.encode() + b"/request/method")
        answer = await self.raw(two + two)
        self.assertEqual(answer.count(b"HTTP/1.1 200 OK\r\n"), 1, answer)
        self.assertIn(b"\r\nConnection: close\r\n", answer)

    async def test_a_request_line_in_pieces(self) -> None:
        _, handler_id = self.handler()
        line = http_request(b"GET", b"/handlers/" + handler_id.encode() + b"/request/method")
        answer = await self.raw(line[:5], line[5:20], line[20:])
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
        self.assertTrue(answer.endswith(b"\r\n\r\nGET"), answer)
        self.assertEqual(self.asked, [handler_id])

    async def test_a_client_that_leaves_before_asking(self) -> None:
        self.assertEqual(await self.raw(leaves=True), b"")
        self.assertEqual(await self.raw(b"GET /handl", leaves=True), b"")
        self.assertEqual(self.asked, [])
        await deferLater(reactor, 0.05, lambda: None)  # a look again after the client left: nothing

    async def test_a_request_line_that_does_not_come_in_time(self) -> None:
        # part of a line, then nothing: closed after the header time (0.4 s here), handed to nobody
        self.assertEqual(await self.raw(b"GET /handl"), b"")
        self.assertEqual(self.asked, [])

    async def test_a_request_line_too_long_goes_to_any_worker_which_refuses_it(self) -> None:
        # refused as the data API refuses it without workers: twisted.web
        # closes a connection whose line is over its length, with no answer
        answer = await self.raw(b"GET /handlers/" + b"x" * LINE_MOST)
        self.assertEqual((self.asked, answer), ([""], b""))

    def test_the_handler_id_of_a_request_line(self) -> None:
        for line, expected in (
            (b"GET /handlers/abc/request/method HTTP/1.1\r", "abc"),
            (b"PUT /handlers/abc?x=1 HTTP/1.1", "abc"),
            (b"GET /handlers/ HTTP/1.1", ""),
            (b"GET /other/abc/x HTTP/1.1", ""),
            (b"GET", ""),
            (b"", ""),
            (b"GET handlers/abc/x HTTP/1.1", ""),
        ):
            self.assertEqual(handler_id_in(line), expected, line)
