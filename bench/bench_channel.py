#!/usr/bin/env python3
"""
What a request costs in CPU on the listeners' connections, in memory, same
process: N keep-alive requests

- of a bare twisted.web leaf, through twisted.web's own HTTP channel and
  through kapow's guarded one (:class:`kapow.web.connections.GuardedChannel`):
  what the guards cost;
- of the data API (the data app, :class:`kapow.data.api.DataAPI`, on the
  guarded channel) for a handler of an in-memory user request: the calls
  ``kapow get``/``kapow set`` make, a read, a status write and a body write.

CPU microseconds per request for each, the best of three runs.

Usage: python bench/bench_channel.py [-n 50000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from twisted.internet.interfaces import IProtocol
    from twisted.internet.testing import StringTransport


def per_request(n: int, protocol: IProtocol, request: bytes, *transports: StringTransport) -> float:
    """
    The least CPU microseconds per request of ``n`` ``request`` received by
    ``protocol`` over three runs (what ``transports`` were sent is dropped).
    """
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(n):
            protocol.dataReceived(request)
            for transport in transports:
                transport.clear()
        best = min(best, time.process_time() - start)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=50000)
    args = parser.parse_args()

    from tests.support.user_connection import ROUTE, UserConnection, http_request
    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from kapow.data.api import DataAPI
    from kapow.handlers.handler import HandlerRegistry
    from kapow.web.connections import Timeouts, guarded_protocol
    from kapow.web.errors import QuietSite

    loopback = IPv4Address("TCP", "127.0.0.1", 40000)

    def connected(site: Site, guarded: bool) -> tuple[IProtocol, StringTransport]:
        if guarded:
            site.protocol = guarded_protocol(Timeouts(30, 60, 500), reactor, tls=False)
        protocol = site.buildProtocol(loopback)
        transport = StringTransport(peerAddress=loopback, hostAddress=loopback)
        protocol.makeConnection(transport)
        return protocol, transport

    class Hello(Resource):
        isLeaf = True

        def render(self, request):
            return b"hello"

    hello = b"GET /x HTTP/1.1\r\nHost: localhost\r\nUser-Agent: bench\r\n\r\n"
    for name in ("twisted.web", "guarded"):
        protocol, transport = connected(Site(Hello(), reactor=reactor), name == "guarded")
        print(f"hello, {name:21} {per_request(args.n, protocol, hello, transport):6.1f} us CPU per request")

    calls = {
        "GET /request/method": b"GET %s/request/method HTTP/1.1\r\nHost: 127.0.0.1:8082\r\n\r\n",
        "PUT /response/status": b"PUT %s/response/status HTTP/1.1\r\nHost: 127.0.0.1:8082\r\n"
        b"Content-Length: 3\r\n\r\n201",
        "PUT /response/body": b"PUT %s/response/body HTTP/1.1\r\nHost: 127.0.0.1:8082\r\n"
        b"Content-Length: 6\r\n\r\nhello\n",
    }
    for name, call in calls.items():
        handlers = HandlerRegistry()
        user = UserConnection(http_request(b"POST", b"/x", [(b"Host", b"h")], b"x"))
        handler = handlers.create(ROUTE, {}, user.request)
        request = call % (b"/handlers/" + handler.id.encode())
        protocol, transport = connected(QuietSite(DataAPI(handlers).resource(), reactor=reactor), True)
        protocol.dataReceived(request)
        assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n"), transport.value()
        cost = per_request(args.n, protocol, request, transport, user.transport)
        print(f"data, {name:22} {cost:6.1f} us CPU per request")


if __name__ == "__main__":
    main()
