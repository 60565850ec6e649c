"""
The figures of ``bench/bench_latency.py``: reading what its wrk script
printed, nearest-rank percentiles of a latency histogram, the share of
requests at or above each latency that it draws, and its output lines.
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench() -> ModuleType:
    """Import the benchmark script (and the bench module it imports) from ``bench/``."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("bench_latency")
    finally:
        sys.path.remove(str(BENCH))


bench = load_bench()

WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:40001/hello
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     8.10ms    4.02ms  40.00ms   90.00%
    Req/Sec   500.00     20.00   550.00     70.00%
  2000 requests in 2.00s, 200.00KB read
Requests/sec:   1000.00
Transfer/sec:    100.00KB
summary 2000000 2000 1 2 3 4 5
latency 812 3
latency 4080 1
latency 40000 1
"""


def test_parse_wrk_reads_the_summary_and_the_histogram() -> None:
    run = bench.parse_wrk(WRK_OUTPUT)
    assert (run.requests, run.seconds, run.errors) == (2000, 2.0, 15)
    assert run.histogram == {812: 3, 4080: 1, 40000: 1}
    assert run.rps == 1000.0


def test_parse_wrk_without_a_summary_fails() -> None:
    with pytest.raises(ValueError, match="no summary"):
        bench.parse_wrk("unable to connect to 127.0.0.1:40001 Connection refused\n")


def test_runs_add_up() -> None:
    first = bench.parse_wrk(WRK_OUTPUT)
    second = bench.Run(1000, 2.0, 1, Counter({812: 1, 9000: 2}))
    total = first + second
    assert (total.requests, total.seconds, total.errors) == (3000, 4.0, 16)
    assert total.histogram == {812: 4, 4080: 1, 9000: 2, 40000: 1}
    assert total.rps == 750.0
    assert bench.Run().rps == 0.0


@pytest.mark.parametrize(
    ("p", "expected"),
    [(50, 500), (90, 900), (99, 990), (99.9, 999), (100, 1000), (0.05, 1)],
)
def test_percentiles_are_nearest_rank(p: float, expected: int) -> None:
    histogram = Counter(range(1, 1001))
    assert bench.percentile(histogram, p) == expected


def test_percentiles_count_repeated_latencies() -> None:
    histogram = {10: 5, 20: 4, 300: 1}
    assert [bench.percentile(histogram, p) for p in (50, 51, 90, 91, 99.9)] == [10, 20, 20, 300, 300]


def test_the_percentile_of_no_latencies_is_nan() -> None:
    assert math.isnan(bench.percentile({}, 50))


def test_shares_at_or_above_each_latency() -> None:
    xs, ys = bench.at_or_above({2000: 1, 500: 2, 1000: 1})
    assert xs == [0.5, 1.0, 2.0]
    assert ys == [1.0, 0.5, 0.25]


def test_figure_lines_give_ours_the_reference_and_the_ratio() -> None:
    assert bench.figure_line("true.seq.median", 3.0, 2.0) == "true.seq.median 3.000 2.000 1.50"
    assert bench.figure_line("hello.c8.errors", 4, 0, 0) == "hello.c8.errors 4 0 -"


def test_load_lines_in_milliseconds() -> None:
    ours = bench.Run(4, 2.0, 0, Counter({1000: 2, 3000: 1, 10000: 1}))
    reference = bench.Run(2, 2.0, 1, Counter({2000: 2}))
    assert bench.load_lines("hello.c8", ours, reference) == [
        "hello.c8.p50 1.000 2.000 0.50",
        "hello.c8.p90 10.000 2.000 5.00",
        "hello.c8.p99 10.000 2.000 5.00",
        "hello.c8.p99.9 10.000 2.000 5.00",
        "hello.c8.rps 2.0 1.0 2.00",
        "hello.c8.errors 0 1 0.00",
    ]


def test_the_init_program_adds_each_route_with_its_command(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    kapow = bindir / "kapow"
    kapow.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" >> {calls}\nprintf "\\0" >> {calls}\n')
    kapow.chmod(0o755)
    init = bench.init_program(tmp_path)
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}
    subprocess.run([str(init)], env=env, check=True)
    added = [call.split("\0") for call in calls.read_text().split("\0\0")[:-1]]
    assert added == [
        ["route", "add", pattern, "-c", command] for pattern, command, _ in bench.ROUTES.values()
    ]
    assert (tmp_path / "init.done").exists()
    assert not (tmp_path / "init.failed").exists()


def test_the_init_program_tells_when_a_route_was_not_added(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "kapow").write_text("#!/bin/sh\nexit 1\n")
    (bindir / "kapow").chmod(0o755)
    subprocess.run([str(bench.init_program(tmp_path))], env={"PATH": f"{bindir}:/usr/bin:/bin"}, check=True)
    assert (tmp_path / "init.failed").exists()
    assert not (tmp_path / "init.done").exists()
