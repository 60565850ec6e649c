#!/usr/bin/env python3
"""
What the listeners' guards cost per request: N keep-alive requests through
twisted.web's own HTTP channel and through kapow's guarded one
(:class:`kapow.web.connections.GuardedChannel`), in memory, same resource, same
process; CPU microseconds per request for each.

Usage: python bench/bench_channel.py [-n 50000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=50000)
    args = parser.parse_args()

    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from kapow.web.connections import Timeouts, guarded_protocol

    class Hello(Resource):
        isLeaf = True

        def render(self, request):
            return b"hello"

    request = b"GET /x HTTP/1.1\r\nHost: localhost\r\nUser-Agent: bench\r\n\r\n"
    for name in ("twisted.web", "guarded", "twisted.web", "guarded"):
        site = Site(Hello(), reactor=reactor)
        if name == "guarded":
            site.protocol = guarded_protocol(Timeouts(30, 60, 500), reactor)
        protocol = site.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1))
        protocol.makeConnection(transport)
        start = time.process_time()
        for _ in range(args.n):
            protocol.dataReceived(request)
            transport.clear()
        used = time.process_time() - start
        print(f"{name:12} {used / args.n * 1e6:6.1f} us CPU per request")


if __name__ == "__main__":
    main()
