#!/usr/bin/env python3
"""
Latency percentiles per route, ``kapow server`` beside the Go reference, from
one run: both servers run at once, each with the routes of :data:`ROUTES`
(added by its own ``kapow route add``), and for each route and concurrency
``wrk`` drives ours and the reference alternately, the order swapped every
round, so that the machine's noise falls on both.

Usage: .venv/bin/python bench/bench_latency.py --reference PATH [--duration S]
           [--concurrency 8,32] [--routes hello,echo,five,true] [--rounds N]
           [--seq N] [--png FILE] [--ours PATH] [-- EXTRA_SERVER_ARGS_FOR_OURS]

Output (stdout), one figure a line, ``name ours reference ours/reference``:
``ROUTE.cN.p50``, ``.p90``, ``.p99``, ``.p99.9`` (ms), ``ROUTE.cN.rps``
(requests/s), ``ROUTE.cN.errors`` and ``ROUTE.seq.median`` (ms, one curl per
request, new connection each time, the median of the ``--seq`` answers), and the
one-minute load average at the start and at the end.

The latencies are wrk's own histogram (1 µs buckets, all rounds merged),
read by a ``done`` hook, the distribution wrk's ``--latency`` percentiles come
from: it holds wrk's correction for coordinated omission. Percentiles are
nearest-rank. With ``--png FILE`` (and matplotlib: ``pip install -e
'.[bench]'``) it draws, for each route and concurrency, the share of requests
at or above each latency, log-log, ours and the reference: the tail's shape.

Needs ``wrk`` and ``curl``.
"""

from __future__ import annotations

import argparse
import bisect
import importlib.util
import itertools
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import ROUTES as BENCH_SH_COMMANDS
from bench_startup import VENV_BIN, free_port, wait_route

HOST = "127.0.0.1"
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
BOOT_TIMEOUT = 120.0

#: name -> (URL pattern, command, path requested)
ROUTES = {
    "hello": ("/hello", "echo hello | kapow set /response/body", "/hello"),
    "echo": ("/echo/{name}", "kapow get /request/matches/name | kapow set /response/body", "/echo/bench"),
    "five": ("/five", BENCH_SH_COMMANDS["five"], "/five"),
    "true": ("/true", BENCH_SH_COMMANDS["true"], "/true"),
}

#: a wrk script printing the run's summary and its latency histogram
HISTOGRAM_LUA = """\
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("summary %d %d %d %d %d %d %d\\n", summary.duration, summary.requests,
                         e.connect, e.read, e.write, e.status, e.timeout))
  for i = 1, #latency do
    local value, count = latency(i)
    io.write(string.format("latency %d %d\\n", value, count))
  end
end
"""


def log(message: str) -> None:
    print(f"[bench_latency] {message}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


# ------------------------------------------------------------------ figures


@dataclass
class Run:
    """What one or more wrk runs measured: latencies in µs -> how many."""

    requests: int = 0
    seconds: float = 0.0
    errors: int = 0
    histogram: Counter[int] = field(default_factory=Counter)

    def __add__(self, other: Run) -> Run:
        return Run(
            self.requests + other.requests,
            self.seconds + other.seconds,
            self.errors + other.errors,
            self.histogram + other.histogram,
        )

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def parse_wrk(output: str) -> Run:
    """Read the lines :data:`HISTOGRAM_LUA` printed among wrk's own."""
    run = None
    histogram: Counter[int] = Counter()
    for line in output.splitlines():
        fields = line.split()
        if fields[:1] == ["summary"] and len(fields) == 8:
            duration, requests, *errors = (int(n) for n in fields[1:])
            run = Run(requests, duration / 1e6, sum(errors))
        elif fields[:1] == ["latency"] and len(fields) == 3:
            histogram[int(fields[1])] += int(fields[2])
    if run is None:
        raise ValueError(f"wrk printed no summary:\n{output}")
    run.histogram = histogram
    return run


def percentile(histogram: Mapping[int, int], p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of a histogram, NaN if it is empty."""
    total = sum(histogram.values())
    if not total:
        return math.nan
    rank = max(1, math.ceil(round(total * p / 100, 9)))
    values = sorted(histogram)
    return values[bisect.bisect_left(list(itertools.accumulate(histogram[v] for v in values)), rank)]


def at_or_above(histogram: Mapping[int, int]) -> tuple[list[float], list[float]]:
    """Each latency (ms), ascending, and the share of the requests that took at least as long."""
    total = sum(histogram.values())
    values = sorted(histogram)
    shares = []
    left = total
    for value in values:
        shares.append(left / total)
        left -= histogram[value]
    return [value / 1000 for value in values], shares


def figure_line(name: str, ours: float, reference: float, digits: int = 3) -> str:
    """``name ours reference ours/reference`` (``-`` for a ratio to zero)."""
    ratio = f"{ours / reference:.2f}" if reference else "-"
    return f"{name} {ours:.{digits}f} {reference:.{digits}f} {ratio}"


def load_lines(name: str, ours: Run, reference: Run) -> list[str]:
    """The percentiles, rate and errors of one route at one concurrency."""
    lines = [
        figure_line(
            f"{name}.p{p:g}", percentile(ours.histogram, p) / 1000, percentile(reference.histogram, p) / 1000
        )
        for p in PERCENTILES
    ]
    lines.append(figure_line(f"{name}.rps", ours.rps, reference.rps, 1))
    lines.append(figure_line(f"{name}.errors", ours.errors, reference.errors, 0))
    return lines


# ------------------------------------------------------------------ servers


@dataclass
class Server:
    """A server started here, in a session (process group) of its own."""

    process: subprocess.Popen[bytes]
    url: str
    logfile: IO[bytes]

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            self.process.wait()
        self.logfile.close()


def init_program(work: Path) -> Path:
    """An init program adding the routes, then touching ``init.done`` (or ``init.failed``)."""
    lines = [
        "#!/bin/sh",
        f"exec >{shlex.quote(str(work / 'init.log'))} 2>&1",
        "ok=1",
        'add() { kapow route add "$@" || ok=0; echo; }',
        *(f"add {shlex.quote(pattern)} -c {shlex.quote(command)}" for pattern, command, _ in ROUTES.values()),
        f"if [ $ok = 1 ]; then touch {shlex.quote(str(work / 'init.done'))};"
        f" else touch {shlex.quote(str(work / 'init.failed'))}; fi",
    ]
    init = work / "init.sh"
    init.write_text("\n".join(lines) + "\n")
    init.chmod(0o755)
    return init


def start_server(kapow: str, work: Path, extra: Sequence[str]) -> Server:
    """
    Start ``kapow server`` of an implementation (its own ``kapow`` first
    on PATH, ``KAPOW_CONTROL_URL``/``KAPOW_DATA_URL`` set,
    ``--control-reachable-addr`` where it has one) and wait until its init
    program is through and ``/hello`` answers 200.
    """
    work.mkdir()
    kapow = os.path.realpath(kapow)
    (work / "bin").mkdir()
    (work / "bin" / "kapow").symlink_to(kapow)
    user, control, data = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "KAPOW_HANDLER_ID"}
    env["KAPOW_CONTROL_URL"] = f"https://{HOST}:{control}"
    env["KAPOW_DATA_URL"] = f"http://{HOST}:{data}"
    env["PATH"] = f"{work / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
    argv = [kapow, "server", "--bind", f"{HOST}:{user}", "--control-bind", f"{HOST}:{control}"]
    argv += ["--data-bind", f"{HOST}:{data}"]
    server_help = subprocess.run([kapow, "server", "--help"], capture_output=True, text=True)
    if "--control-reachable-addr" in server_help.stdout + server_help.stderr:
        argv += ["--control-reachable-addr", f"{HOST}:{control}"]
    argv += [*extra, str(init_program(work))]
    logfile = (work / "server.log").open("wb")
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=logfile,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    server = Server(process, f"http://{HOST}:{user}", logfile)
    try:
        wait_ready(server, work, user)
    except BaseException:
        server.stop()
        raise
    return server


def wait_ready(server: Server, work: Path, port: int) -> None:
    """Wait for the init program and the first answer; fail with the logs."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not (work / "init.done").exists():
        if (
            server.process.poll() is not None
            or (work / "init.failed").exists()
            or time.monotonic() > deadline
        ):
            logs = [(work / name).read_text(errors="replace") for name in ("server.log", "init.log")]
            raise SystemExit(f"bench_latency: {work.name} server not ready\n" + "\n".join(logs))
        time.sleep(0.05)
    wait_route(port, "/hello", deadline)


# ------------------------------------------------------------------ drivers


def wrk(url: str, connections: int, seconds: int, script: Path) -> Run:
    """One wrk run: a thread a connection up to one a CPU, 10 s timeout, an ``X-Bench`` header."""
    threads = min(connections, len(os.sched_getaffinity(0)))
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
    argv += ["-s", str(script), "-H", "X-Bench: v", url]
    return parse_wrk(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def curl_ms(url: str) -> float | None:
    """One request in a curl of its own (a new connection): its ms, or None unless it got a 200."""
    argv = ["curl", "-s", "-o", "/dev/null", "-H", "X-Bench: v", "-w", "%{http_code} %{time_total}", url]
    status, seconds = subprocess.run(argv, capture_output=True, text=True).stdout.split()
    return float(seconds) * 1000 if status == "200" else None


def sequential(urls: Mapping[str, str], requests: int) -> dict[str, float]:
    """The median of ``requests`` answered requests, one at a time, alternating between the servers."""
    times: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(requests):
        for name, url in urls.items():
            ms = curl_ms(url)
            if ms is not None:
                times[name].append(ms)
    return {name: statistics.median(found) if found else math.nan for name, found in times.items()}


def load(
    servers: Mapping[str, Server],
    routes: Sequence[str],
    concurrencies: Sequence[int],
    rounds: int,
    seconds: int,
    script: Path,
) -> dict[tuple[str, int, str], Run]:
    """
    ``rounds`` wrk runs of each server, route and concurrency, the servers
    alternating (the first one swapped every round), merged.
    """
    merged: dict[tuple[str, int, str], Run] = {}
    for number in range(rounds):
        order = list(servers) if number % 2 == 0 else list(servers)[::-1]
        for route in routes:
            for connections in concurrencies:
                for name in order:
                    log(f"round {number + 1}/{rounds}: {route} -c{connections} {name}, {seconds} s")
                    time.sleep(1)
                    run = wrk(servers[name].url + ROUTES[route][2], connections, seconds, script)
                    if run.errors:
                        log(f"{route} -c{connections} {name}: {run.errors} errors")
                    key = (route, connections, name)
                    merged[key] = merged.get(key, Run()) + run
    return merged


# ------------------------------------------------------------------ drawing


def draw(
    png: str,
    title: str,
    runs: Mapping[tuple[str, int, str], Run],
    routes: Sequence[str],
    concurrencies: Sequence[int],
) -> None:
    """One log-log plot a route and concurrency: the share of requests at or above each latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    figure, axes = plt.subplots(
        len(routes),
        len(concurrencies),
        figsize=(5 * len(concurrencies), 3.6 * len(routes)),
        squeeze=False,
        layout="constrained",
    )
    ticks = [1, 0.5, 0.1, 0.01, 0.001, 0.0001]
    for row, route in enumerate(routes):
        for column, connections in enumerate(concurrencies):
            ax = axes[row][column]
            for name in ("ours", "reference"):
                xs, ys = at_or_above(runs[route, connections, name].histogram)
                ax.step(xs, ys, where="pre", label=name)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda ms, _: f"{ms:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_yscale("log")
            ax.set_yticks(ticks, ["all", "p50", "p90", "p99", "p99.9", "p99.99"])
            ax.yaxis.set_minor_locator(NullLocator())
            ax.grid(True, which="major", alpha=0.4)
            ax.set_title(f"{route}, {connections} connections")
            ax.set_xlabel("latency (ms)")
            ax.set_ylabel("requests at or above")
            ax.legend(loc="lower left")
    figure.suptitle(title)
    figure.savefig(png, dpi=100)
    plt.close(figure)


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds of each wrk run")
    parser.add_argument("--concurrency", default="8,32", help="connections, comma-separated")
    parser.add_argument("--routes", default=",".join(ROUTES), help="routes, comma-separated")
    parser.add_argument(
        "--rounds", type=int, default=2, help="wrk runs of each server, route and concurrency"
    )
    parser.add_argument(
        "--seq", type=int, default=200, metavar="N", help="sequential requests a route (0: none)"
    )
    parser.add_argument("--png", help="draw the latency distributions to this PNG file")
    parser.add_argument("--ours", default=str(VENV_BIN / "kapow"), help="our kapow (default: the venv's)")
    parser.add_argument("--reference", required=True, help="the Go reference kapow binary")
    parser.add_argument("server_args", nargs="*", help="more options of our kapow server")
    args = parser.parse_args()
    routes = args.routes.split(",")
    if unknown := [route for route in routes if route not in ROUTES]:
        parser.error(f"unknown route {unknown[0]!r} (routes: {', '.join(ROUTES)})")
    try:
        concurrencies = [int(connections) for connections in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency {args.concurrency!r}: expected numbers, comma-separated")
    for tool in ("wrk", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_latency: {tool} is not installed")
    for path in (args.ours, args.reference):
        if not os.access(path, os.X_OK):
            sys.exit(f"bench_latency: {path} is not executable")
    if args.png and importlib.util.find_spec("matplotlib") is None:
        log("matplotlib is not installed (pip install -e '.[bench]'): no PNG will be drawn")
        args.png = None

    print(f"nproc {len(os.sched_getaffinity(0))}")
    print(f"loadavg1_start {loadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        work = Path(tmp)
        script = work / "histogram.lua"
        script.write_text(HISTOGRAM_LUA)
        servers: dict[str, Server] = {}
        try:
            servers["ours"] = start_server(args.ours, work / "ours", args.server_args)
            servers["reference"] = start_server(args.reference, work / "reference", ())
            for route in routes if args.seq else ():
                log(f"{route}: {args.seq} sequential requests to each server")
                urls = {name: server.url + ROUTES[route][2] for name, server in servers.items()}
                medians = sequential(urls, args.seq)
                print(figure_line(f"{route}.seq.median", medians["ours"], medians["reference"]), flush=True)
            runs = load(servers, routes, concurrencies, args.rounds, args.duration, script)
        finally:
            for server in servers.values():
                server.stop()
    for route in routes:
        for connections in concurrencies:
            ours, reference = runs[route, connections, "ours"], runs[route, connections, "reference"]
            print("\n".join(load_lines(f"{route}.c{connections}", ours, reference)))
    print(f"loadavg1_end {loadavg()}", flush=True)
    if args.png:
        title = f"wrk: {args.rounds} runs of {args.duration} s for each server, route and concurrency"
        draw(args.png, title, runs, routes, concurrencies)
        log(f"drew {args.png}")


if __name__ == "__main__":
    main()
