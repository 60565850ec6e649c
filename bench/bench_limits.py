#!/usr/bin/env python3
"""
What resource limits cost per handler start: a handler started as a route
without limits is (``posix_spawn`` of the program, in a process group of its own),
and as a route with limits is (the same, through ``kapow --with-limits`` or
``prlimit``), each started and reaped ``--spawns`` times, in rounds that
alternate the three, from a process about the size of a running server.

Usage: python bench/bench_limits.py [--spawns N] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import twisted.web.server  # noqa: F401  (a server-sized process: fork costs grow with it)

from kapow.commands.launcher import native_client
from kapow.core.resource_limits import LimitedCommand

LIMITS = {"memory": 1 << 30, "cpu": 60, "open_files": 256}
ARGV = ["/bin/sh", "-c", "true"]


def start_and_reap(argv: list[str], devnull: int, env: dict[str, str]) -> None:
    dup = os.POSIX_SPAWN_DUP2
    pid = os.posix_spawnp(
        argv[0],
        argv,
        env,
        file_actions=[(dup, devnull, 0), (dup, devnull, 1), (dup, devnull, 2)],
        setpgroup=0,
    )
    os.waitpid(pid, 0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spawns", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    ways = {"no limits": ARGV}
    if native_client() is not None:
        ways["kapow --with-limits"] = LimitedCommand(native_client(), None).argv(LIMITS, ARGV[0], ARGV)
    if shutil.which("prlimit"):
        ways["prlimit"] = LimitedCommand(None, shutil.which("prlimit")).argv(LIMITS, ARGV[0], ARGV)
    devnull = os.open(os.devnull, os.O_RDWR)
    env = dict(os.environ)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, argv in ways.items():
            began = time.perf_counter()
            for _ in range(args.spawns):
                start_and_reap(argv, devnull, env)
            times[name].append((time.perf_counter() - began) / args.spawns * 1000)
    base = statistics.median(times["no limits"])
    for name, found in times.items():
        median = statistics.median(found)
        print(f"{name:22s} {median:6.3f} ms per start (min {min(found):.3f})  {median - base:+.3f} ms")


if __name__ == "__main__":
    main()
