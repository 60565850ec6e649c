# -*- test-case-name: tests.e2e.test_data_proxy -*-
"""
The data API of ``--data-bind`` with ``--workers N``: every handler lives in
a worker, with the worker's own data API on loopback; the main process
forwards each call to the worker the handler id names, over connections it
keeps open, and streams the answer back as it comes. An appending PUT is
answered when the worker answers it, so the flow control of ``kapow set``
reaches the user's connection as it does without workers.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from kapow.web.errors import reason_body

log = Logger()

#: Headers of one hop, never forwarded (RFC 9110 section 7.6.1), and those the
#: forwarding connection sets itself.
_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"host", b"content-length",
    }
)  # fmt: skip


class _Relay(Protocol):
    """Writes a worker's answer to the caller as it arrives."""

    def __init__(self, request: Request) -> None:
        self.request = request

    def dataReceived(self, data: bytes) -> None:
        if not self.request._disconnected:
            self.request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not reason.check(ResponseDone, PotentialDataLoss):
            log.info("a forwarded data API answer was cut: {why}", why=reason.getErrorMessage())
        if not self.request._disconnected and not self.request.finished:
            self.request.finish()


class DataProxy(Resource):
    """
    :param reactor: connects to the workers (and, as twisted.web's
        ``Agent`` needs, provides ``IReactorTime`` too).
    :param address: the ``(host, port)`` of the data API of the worker that
        serves a handler id (any worker for an id of none, which answers as
        the data API does), or ``None`` when that worker is gone.
    """

    isLeaf = True

    def __init__(self, reactor: IReactorTCP, address: Callable[[str], tuple[str, int] | None]) -> None:
        super().__init__()
        self.address = address
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 16
        self.agent = Agent(reactor, pool=pool)

    def render(self, request: Request) -> bytes | int:
        segments = request.path.split(b"/", 3)
        handler_id = segments[2].decode("latin-1") if len(segments) > 2 and segments[1] == b"handlers" else ""
        address = self.address(handler_id)
        if address is None:
            return reason_body(request, 404, "Handler ID Not Found")
        host, port = address
        headers = Headers(
            {
                name: values
                for name, values in request.requestHeaders.getAllRawHeaders()
                if name.lower() not in _HOP
            }
        )
        content = request.content
        assert content is not None  # twisted.web renders a request once its body is in
        content.seek(0, 2)
        size = content.tell()
        content.seek(0)
        body = FileBodyProducer(content) if size else None
        d = self.agent.request(
            request.method, b"http://%s:%d%s" % (host.encode(), port, request.uri), headers, body
        )
        d.addCallbacks(self._answer, self._unreachable, callbackArgs=(request,), errbackArgs=(request,))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    def _answer(self, response: IResponse, request: Request) -> None:
        if request._disconnected:
            response.deliverBody(Protocol())
            return
        request.setResponseCode(response.code, response.phrase)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in _HOP:
                request.responseHeaders.setRawHeaders(name, values)
        if response.length is not UNKNOWN_LENGTH:
            request.setHeader(b"Content-Length", b"%d" % response.length)
        response.deliverBody(_Relay(request))

    def _unreachable(self, failure: Failure, request: Request) -> None:
        if failure.check(CancelledError) or request._disconnected:
            return
        log.info("data API call not forwarded: {why}", why=failure.getErrorMessage())
        request.write(reason_body(request, 404, "Handler ID Not Found"))  # its worker is gone, and it with it
        request.finish()
