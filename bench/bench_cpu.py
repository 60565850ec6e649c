#!/usr/bin/env python3
"""
The server's CPU per request on the side-by-side benchmark's routes
(``../shared/bench/bench.sh``): ``true`` (the command ``true``: a spawn and
nothing else) and ``five`` (3 x ``kapow get`` + 2 x ``kapow set``), each
driven by ``wrk`` at C connections for SECONDS, ROUNDS times.

For each run: requests per second, and per request the server's CPU time
(user and system, from ``/proc``) in its main thread (the reactor) and in
its other threads (spawns waiting in a thread), its context switches, the
CPU time of the handlers it reaped (their run, from ``exec`` to exit), and
the whole machine's busy CPU time (``/proc/stat``, ``wrk`` included) with
its idle share. Throughput moves with whatever else the machine runs; the
CPU per request moves much less, so compare that between versions of the
server.

``--baseline DIR`` runs a second server from another version's ``src``
(a copy of the tree, say) and alternates the runs between the two, so that
both see the same machine; the medians are printed side by side. ``--src
DIR`` runs the first server from another ``src`` than this tree's.
``--reference PATH`` runs the Go reference beside it the same way (its
main thread is one of many goroutines' threads: read its sum).

Usage: python bench/bench_cpu.py [-d SECONDS] [-c C] [-r ROUNDS] [--routes true,five]
                                 [--src SRC_DIR] [--baseline SRC_DIR] [--port PORT]
                                 [--reference PATH] [-- SERVER_ARGS...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.kapowserver import KapowServer  # noqa: E402

#: The commands of bench.sh's routes.
ROUTES = {
    "true": "true",
    "five": (
        "m=$(kapow get /request/method); p=$(kapow get /request/path); "
        "h=$(kapow get /request/headers/X-Bench); "
        'printf %s "$m" | kapow set /response/headers/X-Method; '
        'printf "%s %s %s\\n" "$m" "$p" "$h" | kapow set /response/body'
    ),
}

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Usage:
    """CPU seconds and context switches of a process's threads."""

    main_cpu: float = 0.0
    other_cpu: float = 0.0
    switches: int = 0
    #: of the children it reaped
    children_cpu: float = 0.0
    #: of the whole machine: busy, and in all
    machine_busy: float = 0.0
    machine_all: float = 0.0

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.main_cpu - other.main_cpu,
            self.other_cpu - other.other_cpu,
            self.switches - other.switches,
            self.children_cpu - other.children_cpu,
            self.machine_busy - other.machine_busy,
            self.machine_all - other.machine_all,
        )


def usage(pid: int) -> Usage:
    """The CPU time and context switches of every thread of ``pid`` so far, and the machine's."""
    found = Usage()
    stat = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    found.children_cpu = (int(stat[13]) + int(stat[14])) / TICKS  # cutime, cstime
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    found.machine_all = sum(ticks) / TICKS
    found.machine_busy = found.machine_all - (ticks[3] + ticks[4]) / TICKS  # all but idle and iowait
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_bytes().rsplit(b")", 1)[1].split()
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except OSError:
            continue  # a thread that ended meanwhile
        cpu = (int(stat[11]) + int(stat[12])) / TICKS
        if int(task) == pid:
            found.main_cpu += cpu
        else:
            found.other_cpu += cpu
        for line in status.splitlines():
            if "ctxt_switches:" in line:  # voluntary and not
                found.switches += int(line.split()[1])
    return found


@dataclass
class Run:
    """One wrk run against one server."""

    rate: float
    requests: int
    used: Usage

    @property
    def cpu_ms(self) -> float:
        """The server's CPU time per request, in milliseconds."""
        return (self.used.main_cpu + self.used.other_cpu) / self.requests * 1e3

    @property
    def children_ms(self) -> float:
        """The CPU time of the handlers per request, in milliseconds."""
        return self.used.children_cpu / self.requests * 1e3

    @property
    def machine_ms(self) -> float:
        """The machine's busy CPU time per request, in milliseconds."""
        return self.used.machine_busy / self.requests * 1e3

    def __str__(self) -> str:
        per = 1e3 / self.requests
        idle = 1 - self.used.machine_busy / self.used.machine_all if self.used.machine_all else 0.0
        return (
            f"{self.rate:8.1f} req/s   server CPU per request {self.cpu_ms:.3f} ms"
            f" (main {self.used.main_cpu * per:.3f}, other threads {self.used.other_cpu * per:.3f}),"
            f" {self.used.switches / self.requests:.1f} context switches;"
            f" handlers {self.children_ms:.3f} ms, machine {self.machine_ms:.3f} ms ({idle:.0%} idle)"
        )


def run(url: str, pid: int, seconds: int, connections: int) -> Run:
    """``wrk`` against ``url``, and what the server used meanwhile."""
    threads = min(connections, os.cpu_count() or 1)
    before = usage(pid)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-H", "X-Bench: v", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    used = usage(pid) - before
    lines = out.splitlines()
    requests = int(next(line for line in lines if " requests in " in line).split()[0])
    rate = float(next(line for line in lines if line.startswith("Requests/sec")).split()[1])
    if "Non-2xx" in out or "Socket errors" in out:
        print("  wrk reported errors:\n" + out, file=sys.stderr)
    return Run(rate, requests, used)


@dataclass
class Measured:
    """A server the runs go to: its user interface's URL, its pid, and how to stop it."""

    url: str
    pid: int
    stop: Callable[[], None]


def measured(server: KapowServer) -> Measured:
    """What the runs need of one of ours."""
    return Measured(server.user, server.process.pid, server.stop)


def start_reference(work: Path, path: str) -> Measured:
    """The Go reference ``path`` with the same routes (as ``bench_latency.py`` starts it)."""
    from bench_latency import start_server

    server = start_server(path, work, ())
    return Measured(server.url, server.process.pid, server.stop)


def start(work: Path, port: int | None, server_args: list[str], src: str | None) -> KapowServer:
    """A server with bench.sh's routes, from ``src`` (this tree's by default)."""
    binds = []
    if port is not None:
        binds = ["--bind", f"127.0.0.1:{port}", "--control-bind", f"127.0.0.1:{port + 1}"]
        binds += ["--data-bind", f"127.0.0.1:{port + 2}"]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    server = KapowServer(work, extra=[*binds, *server_args], env=env)
    for name, command in ROUTES.items():
        server.add_route(f"/{name}", command)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-d", type=int, default=5, help="seconds per run (default 5)")
    parser.add_argument("-c", type=int, default=8, help="connections (default 8)")
    parser.add_argument("-r", type=int, default=3, help="runs per route (default 3)")
    parser.add_argument("--routes", default="true,five", help="of: " + ", ".join(ROUTES))
    parser.add_argument("--src", help="the src directory of the version to measure (default: this tree's)")
    parser.add_argument("--baseline", help="the src directory of a version to compare with")
    parser.add_argument("--port", type=int, help="user port (the next two: control, data; baseline: +3)")
    parser.add_argument("--reference", help="path of the Go reference kapow binary, measured beside it")
    parser.add_argument("server_args", nargs="*", help="more options of kapow server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        servers: dict[str, Measured] = {}
        try:
            servers["this"] = measured(start(Path(tmp, "this"), args.port, args.server_args, args.src))
            if args.baseline is not None:
                port = None if args.port is None else args.port + 3
                baseline = start(Path(tmp, "baseline"), port, args.server_args, args.baseline)
                servers["baseline"] = measured(baseline)
            if args.reference is not None:
                servers["ref"] = start_reference(Path(tmp, "ref"), args.reference)
            for name in args.routes.split(","):
                runs: dict[str, list[Run]] = {label: [] for label in servers}
                for server in servers.values():
                    run(f"{server.url}/{name}", server.pid, 1, args.c)  # warm up
                for _ in range(args.r):
                    for label, server in servers.items():
                        done = run(f"{server.url}/{name}", server.pid, args.d, args.c)
                        runs[label].append(done)
                        print(f"{name:5} c{args.c} {label:8} {done}", flush=True)
                for label, done in runs.items():
                    print(
                        f"{name:5} c{args.c} {label:8} median: server CPU per request"
                        f" {statistics.median(r.cpu_ms for r in done):.3f} ms,"
                        f" handlers {statistics.median(r.children_ms for r in done):.3f} ms,"
                        f" machine {statistics.median(r.machine_ms for r in done):.3f} ms,"
                        f" {statistics.median(r.rate for r in done):.1f} req/s,"
                        f" {statistics.median(r.used.switches / r.requests for r in done):.1f} context switches"
                    )
        finally:
            for server in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
