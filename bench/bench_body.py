#!/usr/bin/env python3
"""
Memory while a large body passes through a handler: POST SIZE MiB (default
200) to an echo route (`kapow get /request/body | kapow set /response/body`)
of a real server and report the server's peak RSS (VmHWM) before and after,
and the throughput.

Usage: python bench/bench_body.py [--mib 200]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.kapowserver import KapowServer  # noqa: E402


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=200)
    args = parser.parse_args()
    size = args.mib << 20
    block = os.urandom(1 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        server = KapowServer(Path(tmp))
        try:
            server.add_route("/echo", "kapow get /request/body | kapow set /response/body", "-X", "POST")
            host, port = server.user.removeprefix("http://").rsplit(":", 1)
            pid = server.process.pid
            before = peak_rss_kib(pid)
            sent, received = hashlib.sha256(), hashlib.sha256()
            started = time.monotonic()
            conn = http.client.HTTPConnection(host, int(port), timeout=300)
            conn.putrequest("POST", "/echo")
            conn.putheader("Content-Length", str(size))
            conn.endheaders()
            for _ in range(args.mib):
                conn.send(block)
                sent.update(block)
            response = conn.getresponse()
            total = 0
            while chunk := response.read(1 << 20):
                received.update(chunk)
                total += len(chunk)
            elapsed = time.monotonic() - started
            after = peak_rss_kib(pid)
            print(
                f"{args.mib} MiB through an echo handler in {elapsed:.1f} s ({args.mib / elapsed:.0f} MiB/s)"
            )
            print(
                f"  status {response.status}, {total} bytes back, identical: {sent.digest() == received.digest()}"
            )
            print(
                f"  server peak RSS: {before} KiB before, {after} KiB after ({(after - before) / 1024:.1f} MiB more)"
            )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
