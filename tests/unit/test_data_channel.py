"""
kapow.data.channel: the data API's own answers to plain requests, byte for
byte those of twisted.web. Every case sends the same bytes, in the same
pieces, on an in-memory connection to the data API through twisted.web's
channel (:class:`kapow.web.connections.GuardedChannel`) and through
:class:`kapow.data.channel.DataChannel`, against handlers of real user
requests, and compares what came back, what the handler was left with and
whether the connection was closed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from kapow.data.api import DataAPI
from kapow.data.channel import MAX_BODY, DataChannel
from kapow.handlers.handler import HandlerRegistry
from kapow.web.connections import GuardedChannel, Timeouts, guarded_protocol
from kapow.web.errors import QuietSite
from tests.support.user_connection import ROUTE, UserConnection, http_request

HANDLER = b"{id}"
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)
_DATE = re.compile(rb"\r\nDate: [^\r]*")


class Counted(QuietSite):
    """A data site that keeps what each answered call's status was (as the metrics' site reads it)."""

    def __init__(self, resource: Any) -> None:
        super().__init__(resource)
        self.codes: list[int] = []

    def log(self, request: Any) -> None:
        self.codes.append(request.code)


class Run:
    """One connection to the data API through ``channel``, for a new handler."""

    def __init__(self, channel: type[GuardedChannel], user_paused: bool = False) -> None:
        self.registry = HandlerRegistry()
        raw = http_request(b"POST", b"/x", [(b"Host", b"h"), (b"X-Thing", b"a b")], b"form=1")
        self.user = UserConnection(raw)
        self.handler = self.registry.create(ROUTE, {"name": "n"}, self.user.request)
        if user_paused:
            self.user.pause()
        self.site = Counted(DataAPI(self.registry).resource())
        self.clock = Clock()
        self.site.protocol = guarded_protocol(Timeouts(5, 60, 100), self.clock, tls=False, channel=channel)
        self.protocol = self.site.buildProtocol(LOOPBACK)
        self.protocol.callLater = self.clock.callLater  # a timed-out connection's abort timer
        self.transport = StringTransport(peerAddress=LOOPBACK, hostAddress=LOOPBACK)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes, bytewise: bool = False) -> None:
        data = data.replace(HANDLER, self.handler.id.encode())
        for piece in [bytes([b]) for b in data] if bytewise else [data]:
            self.protocol.dataReceived(piece)

    def answers(self) -> bytes:
        out = self.transport.value().replace(self.handler.id.encode(), HANDLER)
        return _DATE.sub(b"\r\nDate: -", out)

    def outcome(self) -> tuple[Any, ...]:
        h = self.handler
        return (
            self.answers(),
            self.transport.disconnecting,
            self.site.codes,
            h.state,
            h.status,
            h.reason,
            sorted(h.headers),
            _DATE.sub(b"\r\nDate: -", self.user.transport.value()),  # the runs may straddle a second
        )


def both(
    pieces: list[bytes],
    between: Callable[[Run], None] | None = None,
    bytewise: bool = False,
    **kwargs: Any,
) -> Any:
    """
    Send ``pieces`` (or, ``bytewise``, each of their bytes alone) through
    twisted.web and through DataChannel; the outcome, asserted equal.
    """
    outcomes = []
    for channel in (GuardedChannel, DataChannel):
        run = Run(channel, **kwargs)
        for piece in pieces:
            run.send(piece, bytewise)
            if between is not None:
                between(run)
        outcomes.append(run.outcome())
    assert outcomes[0] == outcomes[1]
    return outcomes[1]


def req(method: bytes, resource: bytes, body: bytes = b"", close: bool = False, *more: bytes) -> bytes:
    headers = [(b"Host", b"127.0.0.1:8082")]
    if close:
        headers.append((b"Connection", b"close"))
    headers += [tuple(h.split(b": ", 1)) for h in more]  # type: ignore[misc]
    return http_request(method, b"/handlers/" + HANDLER + resource, headers, body)


CASES = {
    "get": [req(b"GET", b"/request/method", b"", True)],
    "get kept alive": [req(b"GET", b"/request/method") + req(b"GET", b"/request/path")],
    "get header": [req(b"GET", b"/request/headers/X-Thing", b"", True)],
    "get escaped": [req(b"GET", b"/request/headers/X%2DThing", b"", True)],
    "get match": [req(b"GET", b"/request/matches/name")],
    "get missing item": [req(b"GET", b"/request/headers/X-None")],
    "get collection": [req(b"GET", b"/request/headers")],
    "get route id": [req(b"GET", b"/route/id")],
    "get form field": [req(b"GET", b"/request/form/form")],
    "bad resource": [req(b"GET", b"/request/nothing")],
    "broken escape": [req(b"GET", b"/request/headers/%zz")],
    "not utf-8": [req(b"GET", b"/request/headers/%ff")],
    "unknown handler": [http_request(b"GET", b"/handlers/nobody/request/method")],
    "outside the tree": [http_request(b"GET", b"/other")],
    "no handler id": [http_request(b"GET", b"/handlers/")],
    "put read-only": [req(b"PUT", b"/request/method", b"x")],
    "get write-only": [req(b"GET", b"/response/status")],
    "delete not removable": [req(b"DELETE", b"/response/status")],
    "post": [req(b"POST", b"/response/status", b"200")],
    "head": [req(b"HEAD", b"/request/method")],
    "set status": [req(b"PUT", b"/response/status", b"201")],
    "set status then reason, one connection": [
        req(b"PUT", b"/response/status", b"404") + req(b"PUT", b"/response/reason", b"Gone Away")
    ],
    "set header then unset": [
        req(b"PUT", b"/response/headers/X-A", b"1"),
        req(b"PUT", b"/response/headers/X-A", b"2"),
        req(b"DELETE", b"/response/headers/X-A", b"", True),
    ],
    "set cookie": [req(b"PUT", b"/response/cookies/c", b"v")],
    "bad status": [req(b"PUT", b"/response/status", b"abc")],
    "log line": [req(b"PUT", b"/server/log", b"a line\n")],
    "body": [req(b"PUT", b"/response/body", b"hello\n")],
    "body empty": [req(b"PUT", b"/response/body", b"")],
    "body largest here": [req(b"PUT", b"/response/body", b"b" * MAX_BODY)],
    "body larger": [req(b"PUT", b"/response/body", b"b" * (MAX_BODY + 1))],
    "end then set": [req(b"PUT", b"/response/end", b"") + req(b"PUT", b"/response/status", b"500")],
    "chunked body": [
        req(b"PUT", b"/response/body", b"", False, b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n"
    ],
    "expect": [req(b"PUT", b"/response/status", b"200", False, b"Expect: 100-continue")],
    "http/1.0": [http_request(b"GET", b"/handlers/" + HANDLER + b"/request/method", version=b"HTTP/1.0")],
    "query": [req(b"GET", b"/request/method?x=1")],
    "two lengths": [req(b"PUT", b"/response/status", b"200", False, b"Content-Length: 3")],
    "bad length": [
        b"PUT /handlers/" + HANDLER + b"/response/status HTTP/1.1\r\nContent-Length: 3x\r\n\r\n200"
    ],
    "folded header": [b"GET /handlers/" + HANDLER + b"/request/method HTTP/1.1\r\nX-A: 1\r\n  2\r\n\r\n"],
    "bad header name": [b"GET /handlers/" + HANDLER + b"/request/method HTTP/1.1\r\nX A: 1\r\n\r\n"],
    "no colon": [b"GET /handlers/" + HANDLER + b"/request/method HTTP/1.1\r\nNoColon\r\n\r\n"],
    "keep-alive then close": [
        req(b"GET", b"/request/method", b"", False, b"Connection: keep-alive")
        + req(b"GET", b"/request/method", b"", True)
        + req(b"GET", b"/request/path")
    ],
    "plain then chunked": [
        req(b"PUT", b"/response/status", b"202")
        + req(b"PUT", b"/response/body", b"", False, b"Transfer-Encoding: chunked")
        + b"2\r\nhi\r\n0\r\n\r\n"
        + req(b"GET", b"/request/method")
    ],
    "garbage": [b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"],
}


@pytest.mark.parametrize("pieces", CASES.values(), ids=CASES.keys())
def test_same_answers_as_twisted_web(pieces):
    both(pieces)


@pytest.mark.parametrize("pieces", CASES.values(), ids=CASES.keys())
def test_same_answers_byte_by_byte(pieces):
    both(pieces, bytewise=True)


def test_plain_calls_are_answered_here():
    """The plain calls never reach twisted.web's request machinery."""
    run = Run(DataChannel)
    run.send(req(b"PUT", b"/response/status", b"201") + req(b"GET", b"/request/method"))
    assert run.protocol._plain and not run.protocol.requests
    assert run.answers().count(b"HTTP/1.1 200 OK\r\n") == 2
    run.send(req(b"HEAD", b"/request/method"))
    assert not run.protocol._plain


def test_body_answered_once_the_user_connection_takes_it():
    """An append waits for the user's connection; nothing more is read meanwhile."""

    waited = []

    def resume_after_first(run: Run) -> None:
        if not run.answers():
            if isinstance(run.protocol, DataChannel):
                assert run.transport.producerState == "paused"
            waited.append(run)
            run.user.resume()

    outcome = both(
        [req(b"PUT", b"/response/body", b"x" * 1000), req(b"GET", b"/request/method")],
        between=resume_after_first,
        user_paused=True,
    )
    assert len(waited) == 2
    assert outcome[0].endswith(b"POST")


def test_body_waiting_then_client_gone():
    for channel in (GuardedChannel, DataChannel):
        run = Run(channel, user_paused=True)
        run.send(req(b"PUT", b"/response/body", b"x" * 1000))
        run.send(req(b"GET", b"/request/method"))
        assert run.answers() == b""
        run.protocol.connectionLost(None)
        run.user.resume()  # the append completes for a connection that is gone
        assert run.answers() == b""


def test_partial_request_times_out():
    """A request that stops arriving half-way gets 408, as on every listener."""
    for channel in (GuardedChannel, DataChannel):
        run = Run(channel)
        run.send(req(b"GET", b"/request/method")[:20])
        run.clock.advance(6)
        assert run.answers().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert run.transport.disconnecting


def test_body_time_allowance_as_twisted_web():
    """A body that arrives slowly has the same allowance: header time plus its bytes at the rate."""
    head = req(b"PUT", b"/response/body", b"x" * 1000)[:-1000]
    states = []
    for channel in (GuardedChannel, DataChannel):
        run = Run(channel)
        run.send(head)
        seen = []
        for second in range(12):
            if second == 4:
                run.send(b"x" * 500)
            run.clock.advance(1)
            seen.append(run.transport.disconnecting)
        states.append((seen, run.answers()))
    assert states[0] == states[1]
    assert states[1][0] == [False] * 10 + [True] * 2
