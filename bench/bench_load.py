#!/usr/bin/env python3
"""
Load and leak check: N requests (default 10,000) at concurrency C (default 32)
against a ``hello`` route of a real ``kapow server`` (or, with ``--true``, a
route that only runs ``true``: the server's own cost per spawn), then the
server's CPU time per request, its open file descriptors and child processes
compared with their idle counts.

Usage: python bench/bench_load.py [-n 10000] [-c 32] [--true] [-- SERVER_ARGS...]
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.kapowserver import KapowServer  # noqa: E402


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def child_pids(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rfind(b")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


def children(pid: int) -> int:
    return len(child_pids(pid))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("-c", type=int, default=32)
    parser.add_argument("--true", action="store_true", help="a route that runs only `true`")
    parser.add_argument("server_args", nargs="*", help="more options of kapow server")
    args = parser.parse_args()
    command, expected = ("true", b"") if args.true else ("echo Hello | kapow set /response/body", b"Hello\n")
    with tempfile.TemporaryDirectory() as tmp:
        server = KapowServer(Path(tmp), extra=args.server_args)
        try:
            server.add_route("/hello", command)
            host, port = server.user.removeprefix("http://").rsplit(":", 1)
            pid = server.process.pid
            # one request first, so lazily opened descriptors are counted as idle
            conn = http.client.HTTPConnection(host, int(port))
            conn.request("GET", "/hello")
            conn.getresponse().read()
            conn.close()
            idle_fds, idle_children, idle_rss = open_fds(pid), children(pid), rss_kib(pid)

            remaining = iter(range(args.n))
            lock = threading.Lock()
            errors: list[str] = []
            ok = [0]

            def worker() -> None:
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                while True:
                    with lock:
                        if next(remaining, None) is None:
                            break
                    try:
                        conn.request("GET", "/hello")
                        response = conn.getresponse()
                        body = response.read()
                        if response.status != 200 or body != expected:
                            errors.append(f"{response.status} {body[:40]!r}")
                        else:
                            with lock:
                                ok[0] += 1
                    except (OSError, http.client.HTTPException) as e:
                        errors.append(repr(e))
                        conn.close()
                        conn = http.client.HTTPConnection(host, int(port), timeout=60)
                conn.close()

            # the server's own processes: itself and what it runs while idle (workers, helpers)
            own = [pid, *child_pids(pid)]
            started, cpu_before = time.monotonic(), sum(map(cpu_seconds, own))
            threads = [threading.Thread(target=worker) for _ in range(args.c)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - started
            server_cpu = sum(map(cpu_seconds, own)) - cpu_before
            peak_rss = rss_kib(pid)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (open_fds(pid) > idle_fds or children(pid) > idle_children):
                time.sleep(0.05)
            print(f"{args.n} requests at concurrency {args.c}: {elapsed:.1f} s, {args.n / elapsed:.0f} req/s")
            print(
                f"  server CPU (its processes, workers included): {server_cpu:.1f} s"
                f" ({server_cpu / args.n * 1000:.3f} ms per request)"
            )
            print(f"  ok {ok[0]}, errors {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
            print(f"  open fds: idle {idle_fds}, after {open_fds(pid)}")
            print(f"  child processes: idle {idle_children}, after {children(pid)}")
            print(f"  RSS: idle {idle_rss} KiB, after load {peak_rss} KiB")
        finally:
            server.stop(signal.SIGTERM)


if __name__ == "__main__":
    main()
