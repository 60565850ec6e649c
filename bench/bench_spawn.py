#!/usr/bin/env python3
"""
The cost of starting one handler: the server's own CPU time and the wall
time per handler, for N handlers running /bin/true through
:class:`kapow.handlers.spawn.Spawner` on a real reactor, C at a time, started by
the fast provider (``--spawn fast``: posix_spawn through the C library, exits
seen through pidfds) or the reactor's (``--spawn reactor``: Twisted's own
processes); ``--debug`` reads their output through pipes, as the server's does.

``--contained`` first moves this process into a cgroup of its own, as the
server does when it can, to show what a handler's start costs there.

Usage: python bench/bench_spawn.py [-n 3000] [-c 1] [--spawn fast|reactor] [--contained] [--debug]
                                   [--wrap PROGRAM]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=3000, help="handlers to start")
    parser.add_argument("-c", type=int, default=1, help="handlers running at once")
    parser.add_argument("--contained", action="store_true", help="run inside a cgroup of our own")
    parser.add_argument("--spawn", choices=("fast", "reactor"), default="fast", help="the provider")
    parser.add_argument("--debug", action="store_true", help="output through pipes")
    parser.add_argument(
        "--wrap",
        default="",
        help="a program in front of /bin/true, e.g. 'setpriv --pdeathsig KILL' (a parent-death signal)",
    )
    args = parser.parse_args()

    from twisted.internet import reactor

    from kapow.handlers.spawn import Spawner, handler_processes

    containment = None
    if args.contained:
        from kapow.handlers.containment import Containment
        from kapow.handlers.processes import ReactorProcesses

        containment = Containment(reactor, ReactorProcesses(reactor))
        containment.privilegedStartService()
        if containment.group is None:
            sys.exit("no writable cgroup here")
    spawner = Spawner(
        reactor,
        lambda: {"PATH": "/usr/bin:/bin"},
        lambda: ("http://x", "https://y"),
        processes=handler_processes(reactor, args.spawn),
        debug=args.debug,
    )
    argv = [*args.wrap.split(), "/bin/true"]
    started = ended = 0
    t0 = c0 = 0.0
    s0 = 0

    def start_one() -> None:
        nonlocal started
        started += 1
        spawner.start("h", argv, exited)

    def exited(status: int | None, sig: int | None) -> None:
        nonlocal ended
        ended += 1
        if started < args.n:
            start_one()
        elif ended == args.n:
            reactor.stop()

    def go() -> None:
        nonlocal t0, c0, s0
        t0, c0, s0 = time.perf_counter(), _cpu(), _switches()
        for _ in range(min(args.c, args.n)):
            start_one()

    reactor.callWhenRunning(go)
    reactor.run()
    wall, cpu, switches = time.perf_counter() - t0, _cpu() - c0, _switches() - s0
    if containment is not None:
        containment.stopService()
    where = "in a cgroup of its own" if args.contained else "where it was started"
    path = f"{args.spawn} provider" + (", output through pipes" if args.debug else "")
    if args.wrap:
        path += f", through {args.wrap}"
    print(
        f"{args.n} handlers, {args.c} at a time, {path}, {where}: "
        f"{wall / args.n * 1e6:.0f} us wall and {cpu / args.n * 1e6:.0f} us server CPU per handler "
        f"({args.n / wall:.0f} handlers/s), {switches / args.n:.1f} context switches per handler"
    )


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _switches() -> int:
    """Context switches of every thread of this process so far."""
    found = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/status") as f:
                found += sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
        except OSError:
            pass  # a thread that ended meanwhile
    return found


if __name__ == "__main__":
    main()
