"""
The data API of ``--data-bind`` with ``--workers N``: every handler lives in
a worker, with the worker's own data API on loopback; the main process
forwards each call to the worker the handler id names, streaming the answer
back as it comes. An appending PUT is answered when the worker answers it,
so the flow control of ``kapow set`` reaches the user's connection as it
does without workers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.web.proxy import ProxyClient, ProxyClientFactory, ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import Request

from kapow.web import reason_body

log = Logger()


class _Forwarding(ProxyClient):
    """A forwarded call, dropped when its caller goes away."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.father.notifyFinish().addErrback(self._caller_gone)

    def _caller_gone(self, reason: Any) -> None:
        self._finished = True
        self.transport.loseConnection()


class _ToWorker(ProxyClientFactory):
    """A forwarded call whose worker cannot be reached: its handler is gone with it."""

    protocol = _Forwarding

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.father.write(reason_body(self.father, 404, "Handler ID Not Found"))
        self.father.finish()


class DataProxy(Resource):
    """
    :param reactor: provides ``connectTCP``.
    :param address: the ``(host, port)`` of the data API of the worker that
        serves a handler id (any worker for an id of none, which answers as
        the data API does), or ``None`` when that worker is gone.
    """

    isLeaf = True

    def __init__(self, reactor: Any, address: Callable[[str], tuple[str, int] | None]) -> None:
        super().__init__()
        self.reactor = reactor
        self.address = address

    def render(self, request: Request) -> Any:
        segments = request.path.split(b"/", 3)
        handler_id = segments[2].decode("latin-1") if len(segments) > 2 and segments[1] == b"handlers" else ""
        address = self.address(handler_id)
        if address is None:
            return reason_body(request, 404, "Handler ID Not Found")
        host, port = address
        forward = ReverseProxyResource(host, port, request.path, reactor=self.reactor)
        forward.proxyClientFactoryClass = _ToWorker
        return forward.render(request)
