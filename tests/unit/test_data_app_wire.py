"""
The data app over twisted.web's own HTTP/1.1 channel, byte for byte. Every
case sends its bytes, whole and then a byte at a time, on an in-memory
connection to the data site (:class:`kapow.web.connections.GuardedChannel`
serving :class:`kapow.data.api.DataAPI`), against a handler of a real user
request, and checks what came back, what the handler was left with, what
the user's connection was sent and whether the data connection was closed:
the calls ``kapow get``/``set``/``unset`` make, the errors of each kind,
and what twisted.web frames (kept-alive and pipelined calls, chunked
bodies, ``Expect``, HTTP/1.0, requests it refuses).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.server import version

from kapow.data.api import DataAPI
from kapow.handlers.handler import HandlerRegistry, State
from kapow.web.connections import Timeouts, guarded_protocol
from kapow.web.errors import QuietSite
from tests.support.user_connection import ROUTE, UserConnection, http_request

HANDLER = b"{id}"
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)
#: A body write of 64 KiB (one chunk of an append).
BIG = 64 * 1024
_DATE = re.compile(rb"\r\nDate: [^\r]*")
#: The user's request the handler of a run answers.
USER_REQUEST = http_request(b"POST", b"/x", [(b"Host", b"h"), (b"X-Thing", b"a b")], b"form=1")


class Counted(QuietSite):
    """A data site that keeps what each answered call's status was (as the metrics' site reads it)."""

    def __init__(self, resource: Any) -> None:
        super().__init__(resource)
        self.codes: list[int] = []

    def log(self, request: Any) -> None:
        self.codes.append(request.code)


class Outcome(NamedTuple):
    """What one connection to the data API came to."""

    #: the answers, with the handler id as ``{id}`` and ``Server`` and ``Date`` as ``-``
    answers: bytes
    #: whether the data connection was closed
    closed: bool = False
    #: the status of each answered call, in order
    codes: tuple[int, ...] = ()
    state: State = State.PENDING
    status: int = 200
    reason: bytes | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    #: what the user's connection was sent, ``Server`` and ``Date`` as ``-``
    user: bytes = b""


def _plain(raw: bytes) -> bytes:
    """``raw`` without what changes with the version of Twisted and the second of the run."""
    return _DATE.sub(b"\r\nDate: -", raw.replace(b"\r\nServer: " + version, b"\r\nServer: -"))


class Run:
    """One connection to the data API, for a new handler."""

    def __init__(self, user_paused: bool = False, raw: bytes = USER_REQUEST) -> None:
        self.registry = HandlerRegistry()
        self.user = UserConnection(raw)
        self.handler = self.registry.create(ROUTE, {"name": "n"}, self.user.request)
        if user_paused:
            self.user.pause()
        self.site = Counted(DataAPI(self.registry).resource())
        self.clock = Clock()
        self.site.protocol = guarded_protocol(Timeouts(5, 60, 100), self.clock, tls=False)
        self.protocol = self.site.buildProtocol(LOOPBACK)
        self.protocol.callLater = self.clock.callLater  # a timed-out connection's abort timer
        self.transport = StringTransport(peerAddress=LOOPBACK, hostAddress=LOOPBACK)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes, bytewise: bool = False) -> None:
        data = data.replace(HANDLER, self.handler.id.encode())
        for piece in [bytes([b]) for b in data] if bytewise else [data]:
            self.protocol.dataReceived(piece)

    def answers(self) -> bytes:
        return _plain(self.transport.value().replace(self.handler.id.encode(), HANDLER))

    def outcome(self) -> Outcome:
        h = self.handler
        return Outcome(
            self.answers(),
            self.transport.disconnecting,
            tuple(self.site.codes),
            h.state,
            h.status,
            h.reason,
            tuple(sorted(h.headers)),
            _plain(self.user.transport.value()),
        )


def sent(pieces: list[bytes], bytewise: bool = False) -> Outcome:
    """Send ``pieces`` (or, ``bytewise``, each of their bytes alone) on a new connection; the outcome."""
    run = Run()
    for piece in pieces:
        run.send(piece, bytewise)
    return run.outcome()


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
    "body 64 KiB": [req(b"PUT", b"/response/body", b"b" * BIG)],
    "body 64 KiB + 1": [req(b"PUT", b"/response/body", b"b" * (BIG + 1))],
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
    "lower-case method": [req(b"get", b"/request/method")],
    "post outside the tree": [http_request(b"POST", b"/other", [(b"Host", b"h")], b"x")],
    "post with a broken escape": [req(b"POST", b"/request/headers/%zz", b"x")],
    "patch": [req(b"PATCH", b"/response/body", b"x")],
    "leading empty segment": [http_request(b"GET", b"//handlers/" + HANDLER + b"/request/method")],
    "trailing slash": [req(b"GET", b"/request/method/")],
    "empty name": [req(b"GET", b"/request/headers/")],
    "empty segment": [req(b"GET", b"/request//method")],
    "handler id alone": [http_request(b"GET", b"/handlers/" + HANDLER)],
    "handler id and slash": [http_request(b"GET", b"/handlers/" + HANDLER + b"/")],
    "root": [http_request(b"GET", b"/")],
    "escaped slash in a name": [req(b"GET", b"/request/headers/X%2FThing")],
    "head of a write-only": [req(b"HEAD", b"/response/status")],
    "head of a missing item": [req(b"HEAD", b"/request/headers/X-None")],
    "host not utf-8": [
        http_request(b"GET", b"/handlers/" + HANDLER + b"/request/method", [(b"Host", b"\xff")])
    ],
    "log with an escaped prefix": [req(b"PUT", b"/server/log/a%20b", b"line")],
    "delete cookie": [req(b"PUT", b"/response/cookies/c", b"v") + req(b"DELETE", b"/response/cookies/c")],
    "delete for an unknown handler": [http_request(b"DELETE", b"/handlers/nobody/response/headers/X-A")],
    "delete with an empty name": [req(b"DELETE", b"/response/headers/")],
    "put to a collection": [req(b"PUT", b"/request/headers", b"x")],
    "put to a file name": [req(b"PUT", b"/request/files/f/filename", b"x")],
    "stream": [req(b"PUT", b"/response/stream", b"hi")],
    "large status": [req(b"PUT", b"/response/status", b"2" * (1024 * 1024 + 1))],
}


EXPECTED = {
    "get": Outcome(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 4\r\n\r\nPOST",
        closed=True,
        codes=(200,),
    ),
    "get kept alive": Outcome(
        (
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 4\r\n\r\nPOST"
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 2\r\n\r\n/x"
        ),
        codes=(200, 200),
    ),
    "get header": Outcome(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 3\r\n\r\na b",
        closed=True,
        codes=(200,),
    ),
    "get escaped": Outcome(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 3\r\n\r\na b",
        closed=True,
        codes=(200,),
    ),
    "get match": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 1\r\n\r\nn",
        codes=(200,),
    ),
    "get missing item": Outcome(
        b'HTTP/1.1 404 Resource Item Not Found\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 37\r\n\r\n{"reason": "Resource Item Not Found"}',
        codes=(404,),
    ),
    "get collection": Outcome(
        b'HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n{"host": ["h"], "x-thing": ["a b"], "content-length": ["6"]}',
        codes=(200,),
    ),
    "get route id": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 7\r\n\r\nroute-1",
        codes=(200,),
    ),
    "get form field": Outcome(
        b'HTTP/1.1 404 Resource Item Not Found\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 37\r\n\r\n{"reason": "Resource Item Not Found"}',
        codes=(404,),
    ),
    "bad resource": Outcome(
        b'HTTP/1.1 400 Invalid Resource Path\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 101\r\n\r\n{"reason": "Invalid Resource Path", "detail": "\'/request/nothing\' is not a resource of the data API"}',
        codes=(400,),
    ),
    "broken escape": Outcome(
        b'HTTP/1.1 400 Invalid Resource Path\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 114\r\n\r\n{"reason": "Invalid Resource Path", "detail": "the path has a \'%\' that is not followed by two hexadecimal digits"}',
        codes=(400,),
    ),
    "not utf-8": Outcome(
        b'HTTP/1.1 400 Invalid Resource Path\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 91\r\n\r\n{"reason": "Invalid Resource Path", "detail": "the path is not UTF-8 once percent-decoded"}',
        codes=(400,),
    ),
    "unknown handler": Outcome(
        b'HTTP/1.1 404 Handler ID Not Found\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 34\r\n\r\n{"reason": "Handler ID Not Found"}',
        codes=(404,),
    ),
    "outside the tree": Outcome(
        b'HTTP/1.1 404 Not Found\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 23\r\n\r\n{"reason": "Not Found"}',
        codes=(404,),
    ),
    "no handler id": Outcome(
        b'HTTP/1.1 404 Not Found\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 23\r\n\r\n{"reason": "Not Found"}',
        codes=(404,),
    ),
    "put read-only": Outcome(
        b'HTTP/1.1 405 Method Not Allowed\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 82\r\n\r\n{"reason": "Method Not Allowed", "detail": "\'/request/method\' takes GET, not PUT"}',
        codes=(405,),
    ),
    "get write-only": Outcome(
        b'HTTP/1.1 405 Method Not Allowed\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 83\r\n\r\n{"reason": "Method Not Allowed", "detail": "\'/response/status\' takes PUT, not GET"}',
        codes=(405,),
    ),
    "delete not removable": Outcome(
        b'HTTP/1.1 405 Method Not Allowed\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 86\r\n\r\n{"reason": "Method Not Allowed", "detail": "\'/response/status\' takes PUT, not DELETE"}',
        codes=(405,),
    ),
    "post": Outcome(
        b'HTTP/1.1 405 Method Not Allowed\r\nServer: -\r\nDate: -\r\nAllow: GET, HEAD, PUT, DELETE\r\nContent-Type: application/json\r\nContent-Length: 32\r\n\r\n{"reason": "Method Not Allowed"}',
        codes=(405,),
    ),
    "head": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 4\r\n\r\n",
        codes=(200,),
    ),
    "set status": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n", codes=(200,), status=201
    ),
    "set status then reason, one connection": Outcome(
        (
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n"
        ),
        codes=(200, 200),
        status=404,
        reason=b"Gone Away",
    ),
    "set header then unset": Outcome(
        (
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n"
        ),
        closed=True,
        codes=(200, 200, 200),
    ),
    "set cookie": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n",
        codes=(200,),
        headers=((b"Set-Cookie", b"c=v"),),
    ),
    "bad status": Outcome(
        b'HTTP/1.1 422 Non Integer Value\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 75\r\n\r\n{"reason": "Non Integer Value", "detail": "status \'abc\' is not an integer"}',
        codes=(422,),
    ),
    "log line": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n", codes=(200,)
    ),
    "body": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n",
        codes=(200,),
        state=State.STREAMING,
        user=b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: text/plain; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello\n\r\n",
    ),
    "body empty": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n", codes=(200,)
    ),
    "body 64 KiB": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n",
        codes=(200,),
        state=State.STREAMING,
        user=b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: text/plain; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\n"
        + b"b" * BIG
        + b"\r\n",
    ),
    "body 64 KiB + 1": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n",
        codes=(200,),
        state=State.STREAMING,
        user=b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: text/plain; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\n"
        + b"b" * BIG
        + b"\r\n1\r\nb\r\n",
    ),
    "end then set": Outcome(
        (
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n"
            b'HTTP/1.1 409 Response Already Ended\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 36\r\n\r\n{"reason": "Response Already Ended"}'
        ),
        codes=(200, 409),
        state=State.ENDED,
        user=b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n",
    ),
    "chunked body": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n",
        codes=(200,),
        state=State.STREAMING,
        user=b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: text/plain; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ),
    "expect": Outcome(
        (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n"
        ),
        codes=(200,),
    ),
    "http/1.0": Outcome(
        b"HTTP/1.0 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 4\r\n\r\nPOST",
        closed=True,
        codes=(200,),
    ),
    "query": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 4\r\n\r\nPOST",
        codes=(200,),
    ),
    "two lengths": Outcome(b"HTTP/1.1 400 Bad Request\r\n\r\n", closed=True, codes=()),
    "bad length": Outcome(b"HTTP/1.1 400 Bad Request\r\n\r\n", closed=True, codes=()),
    "folded header": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 4\r\n\r\nPOST",
        codes=(200,),
    ),
    "bad header name": Outcome(b"HTTP/1.1 400 Bad Request\r\n\r\n", closed=True, codes=()),
    "no colon": Outcome(b"HTTP/1.1 400 Bad Request\r\n\r\n", closed=True, codes=()),
    "keep-alive then close": Outcome(
        (
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 4\r\n\r\nPOST"
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 4\r\n\r\nPOST"
        ),
        closed=True,
        codes=(200, 200),
    ),
    "plain then chunked": Outcome(
        (
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 4\r\n\r\nPOST"
        ),
        codes=(200, 200, 200),
        state=State.STREAMING,
        status=202,
        user=b"HTTP/1.1 202 Accepted\r\nServer: -\r\nDate: -\r\nContent-Type: text/plain; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n",
    ),
    "garbage": Outcome(b"", codes=()),
    "lower-case method": Outcome(
        b'HTTP/1.1 405 Method Not Allowed\r\nServer: -\r\nDate: -\r\nAllow: GET, HEAD, PUT, DELETE\r\nContent-Type: application/json\r\nContent-Length: 32\r\n\r\n{"reason": "Method Not Allowed"}',
        codes=(405,),
    ),
    "post outside the tree": Outcome(
        b'HTTP/1.1 405 Method Not Allowed\r\nServer: -\r\nDate: -\r\nAllow: GET, HEAD, PUT, DELETE\r\nContent-Type: application/json\r\nContent-Length: 32\r\n\r\n{"reason": "Method Not Allowed"}',
        codes=(405,),
    ),
    "post with a broken escape": Outcome(
        b'HTTP/1.1 405 Method Not Allowed\r\nServer: -\r\nDate: -\r\nAllow: GET, HEAD, PUT, DELETE\r\nContent-Type: application/json\r\nContent-Length: 32\r\n\r\n{"reason": "Method Not Allowed"}',
        codes=(405,),
    ),
    "patch": Outcome(
        b'HTTP/1.1 405 Method Not Allowed\r\nServer: -\r\nDate: -\r\nAllow: GET, HEAD, PUT, DELETE\r\nContent-Type: application/json\r\nContent-Length: 32\r\n\r\n{"reason": "Method Not Allowed"}',
        codes=(405,),
    ),
    "leading empty segment": Outcome(
        b'HTTP/1.1 404 Not Found\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 23\r\n\r\n{"reason": "Not Found"}',
        codes=(404,),
    ),
    "trailing slash": Outcome(
        b'HTTP/1.1 400 Invalid Resource Path\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 101\r\n\r\n{"reason": "Invalid Resource Path", "detail": "\'/request/method/\' is not a resource of the data API"}',
        codes=(400,),
    ),
    "empty name": Outcome(
        b'HTTP/1.1 400 Invalid Resource Path\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 102\r\n\r\n{"reason": "Invalid Resource Path", "detail": "\'/request/headers/\' is not a resource of the data API"}',
        codes=(400,),
    ),
    "empty segment": Outcome(
        b'HTTP/1.1 400 Invalid Resource Path\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 101\r\n\r\n{"reason": "Invalid Resource Path", "detail": "\'/request//method\' is not a resource of the data API"}',
        codes=(400,),
    ),
    "handler id alone": Outcome(
        b'HTTP/1.1 404 Not Found\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 23\r\n\r\n{"reason": "Not Found"}',
        codes=(404,),
    ),
    "handler id and slash": Outcome(
        b'HTTP/1.1 404 Not Found\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 23\r\n\r\n{"reason": "Not Found"}',
        codes=(404,),
    ),
    "root": Outcome(
        b'HTTP/1.1 404 Not Found\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 23\r\n\r\n{"reason": "Not Found"}',
        codes=(404,),
    ),
    "escaped slash in a name": Outcome(
        b'HTTP/1.1 400 Invalid Resource Path\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 109\r\n\r\n{"reason": "Invalid Resource Path", "detail": "\'/request/headers/X/Thing\' is not a resource of the data API"}',
        codes=(400,),
    ),
    "head of a write-only": Outcome(
        b"HTTP/1.1 405 Method Not Allowed\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 84\r\n\r\n",
        codes=(405,),
    ),
    "head of a missing item": Outcome(
        b"HTTP/1.1 404 Resource Item Not Found\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 37\r\n\r\n",
        codes=(404,),
    ),
    "host not utf-8": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: application/octet-stream\r\nContent-Length: 4\r\n\r\nPOST",
        codes=(200,),
    ),
    "log with an escaped prefix": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n", codes=(200,)
    ),
    "delete cookie": Outcome(
        (
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n"
        ),
        codes=(200, 200),
    ),
    "delete for an unknown handler": Outcome(
        b'HTTP/1.1 404 Handler ID Not Found\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 34\r\n\r\n{"reason": "Handler ID Not Found"}',
        codes=(404,),
    ),
    "delete with an empty name": Outcome(
        b'HTTP/1.1 400 Invalid Resource Path\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 103\r\n\r\n{"reason": "Invalid Resource Path", "detail": "\'/response/headers/\' is not a resource of the data API"}',
        codes=(400,),
    ),
    "put to a collection": Outcome(
        b'HTTP/1.1 405 Method Not Allowed\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 83\r\n\r\n{"reason": "Method Not Allowed", "detail": "\'/request/headers\' takes GET, not PUT"}',
        codes=(405,),
    ),
    "put to a file name": Outcome(
        b'HTTP/1.1 405 Method Not Allowed\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 92\r\n\r\n{"reason": "Method Not Allowed", "detail": "\'/request/files/f/filename\' takes GET, not PUT"}',
        codes=(405,),
    ),
    "stream": Outcome(
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Length: 0\r\n\r\n",
        codes=(200,),
        state=State.STREAMING,
        user=b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\nContent-Type: text/plain; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n",
    ),
    "large status": Outcome(
        b'HTTP/1.1 413 Request Entity Too Large\r\nServer: -\r\nDate: -\r\nContent-Type: application/json\r\nContent-Length: 144\r\n\r\n{"reason": "Request Entity Too Large", "detail": "the value is over 1048576 bytes, the most a status, reason, header, cookie or log line takes"}',
        codes=(413,),
    ),
}


@pytest.mark.parametrize(
    ("pieces", "expected"), list(zip(CASES.values(), EXPECTED.values(), strict=True)), ids=CASES.keys()
)
def test_answers(pieces: list[bytes], expected: Outcome) -> None:
    assert sent(pieces) == expected


@pytest.mark.parametrize(
    ("pieces", "expected"), list(zip(CASES.values(), EXPECTED.values(), strict=True)), ids=CASES.keys()
)
def test_answers_byte_by_byte(pieces: list[bytes], expected: Outcome) -> None:
    assert sent(pieces, bytewise=True) == expected


def test_every_case_has_its_answer() -> None:
    assert list(CASES) == list(EXPECTED)


def test_body_answered_once_the_user_connection_takes_it() -> None:
    """
    An append waits for the user's connection; the calls after it wait
    for it, and past twisted.web's allowance for them nothing more is read.
    """
    run = Run(user_paused=True)
    run.send(req(b"PUT", b"/response/body", b"x" * 1000))
    assert run.answers() == b""
    run.send(req(b"GET", b"/request/method"))
    assert (run.answers(), run.transport.producerState) == (b"", "producing")
    run.send(req(b"GET", b"/request/method") * 200)
    assert (run.answers(), run.transport.producerState) == (b"", "paused")
    run.user.resume()
    outcome = run.outcome()
    assert outcome.codes == (200,) * 202
    assert outcome.answers.count(b"\r\n\r\nPOST") == 201
    assert run.transport.producerState == "producing"
    assert run.user.response()[2] == b"x" * 1000


def test_body_waiting_then_client_gone() -> None:
    run = Run(user_paused=True)
    run.send(req(b"PUT", b"/response/body", b"x" * 1000))
    run.send(req(b"GET", b"/request/method"))
    assert run.answers() == b""
    run.protocol.connectionLost(None)
    run.user.resume()  # the append completes for a connection that is gone
    assert run.answers() == b""
    assert run.user.response()[2] == b"x" * 1000


def test_partial_request_times_out() -> None:
    """A request that stops arriving half-way gets 408, as on every listener."""
    run = Run()
    run.send(req(b"GET", b"/request/method")[:20])
    run.clock.advance(6)
    assert run.answers().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert run.transport.disconnecting


def test_body_time_allowance() -> None:
    """A body that arrives slowly has its allowance: header time plus its bytes at the rate."""
    run = Run()
    run.send(req(b"PUT", b"/response/body", b"x" * 1000)[:-1000])
    seen = []
    for second in range(12):
        if second == 4:
            run.send(b"x" * 500)
        run.clock.advance(1)
        seen.append(run.transport.disconnecting)
    assert seen == [False] * 10 + [True] * 2
    assert run.answers().startswith(b"HTTP/1.1 408 Request Timeout\r\n")


def test_empty_values_have_a_length() -> None:
    """An empty value is answered with a length of 0, to HEAD too."""
    run = Run(raw=http_request(b"GET", b"/x?q=", [(b"Host", b"h"), (b"X-Empty", b"")]))
    for method in (b"HEAD", b"GET"):
        run.send(req(method, b"/request/params/q") + req(method, b"/request/headers/X-Empty"))
    answer = (
        b"HTTP/1.1 200 OK\r\nServer: -\r\nDate: -\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: 0\r\n\r\n"
    )
    assert run.outcome().answers == answer * 4
