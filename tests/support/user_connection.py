"""
Client connections to the user interface's real site over an in-memory
transport, and the HTTP bytes of requests and responses.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from kapow.core.routes import Route
from kapow.user.site import UserSite

PEER = IPv4Address("TCP", "192.0.2.7", 51234)
ROUTE = Route(id="route-1", method="POST", url_pattern="/x")
BOUNDARY = b"----kapowTestBoundary"
MULTIPART = b"multipart/form-data; boundary=" + BOUNDARY
URLENCODED = b"application/x-www-form-urlencoded"


def http_request(
    method: bytes = b"GET",
    target: bytes = b"/x",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    """The bytes of one HTTP request; a ``Host`` is added unless ``headers`` is given."""
    if headers is None:
        headers = [(b"Host", b"localhost:8080")]
    lines = [b" ".join([method, target, version])]
    lines += [name + b": " + value for name, value in headers]
    if body:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def multipart_body(*parts: tuple[bytes, bytes]) -> bytes:
    """A multipart/form-data body of (Content-Disposition, content) parts."""
    delimiter = b"--" + BOUNDARY
    out = [
        delimiter + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + content
        for disposition, content in parts
    ]
    return b"\r\n".join([*out, delimiter + b"--\r\n"])


class _Capture(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


class SiteConnection:
    """
    One client connection to ``site`` over an in-memory transport, which
    has sent ``raw``.
    """

    def __init__(
        self, site: Site, raw: bytes, peer: Any = PEER, transport: StringTransport | None = None
    ) -> None:
        self.protocol = site.buildProtocol(peer)
        self.transport = StringTransport(peerAddress=peer) if transport is None else transport
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(raw)

    def pause(self) -> None:
        """The client stops reading: the transport pauses its producer."""
        self.transport.producer.pauseProducing()

    def resume(self) -> None:
        self.transport.producer.resumeProducing()

    def lose(self) -> None:
        """The client goes away."""
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def response(self) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """(status, [(lower-case name, value)], body so far) as sent on the wire."""
        return parse_response(self.transport.value())


class UserConnection(SiteConnection):
    """
    One client connection to the user interface's real site over an
    in-memory transport; ``request`` is the request it carried, still open.
    """

    def __init__(self, raw: bytes, peer: Any = PEER, transport: StringTransport | None = None) -> None:
        capture = _Capture()
        super().__init__(UserSite(capture, reactor=Clock()), raw, peer, transport)
        [self.request] = capture.requests


def parse_response(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    head, separator, rest = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete response head in {raw!r}"
    status_line, *lines = head.split(b"\r\n")
    code = int(status_line.split(b" ")[1])
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name.lower(), value.removeprefix(b" ")))
    if (b"transfer-encoding", b"chunked") not in headers:
        return code, headers, rest
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return code, headers, body


def header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name.lower()]
