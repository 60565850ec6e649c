"""
What the run history costs a loaded server, by hand, never in the tests:
servers that differ only in ``--history`` (off, in memory, a file, and a
PostgreSQL URI if given), each with the routes ``hello`` and ``true``,
driven with ``wrk -c8`` in turns in the same minutes, so that the machine's
noise falls on all alike; the median of the rounds, and each as a ratio of
``--history off``.

Usage: ``.venv/bin/python bench/bench_history_load.py [--duration S] [--rounds N] [--postgres URI]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_traffic import KAPOW, free_port, wrk


def start(history: str | None, init: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A server with ``--history history`` (``None``: the default, in memory without systemd)."""
    ports = [free_port() for _ in range(3)]
    chosen = [] if history is None else ["--history", history]
    environ = {name: value for name, value in os.environ.items() if name != "STATE_DIRECTORY"}
    server = subprocess.Popen(
        [KAPOW, "server", "--bind", f"127.0.0.1:{ports[0]}", "--control-bind", f"127.0.0.1:{ports[1]}",
         "--data-bind", f"127.0.0.1:{ports[2]}", *chosen, str(init)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=environ,
    )  # fmt: skip
    base = f"http://127.0.0.1:{ports[0]}"
    for _ in range(100):
        time.sleep(0.1)
        answer = subprocess.run(["curl", "-s", base + "/hello"], capture_output=True, text=True).stdout
        if answer == "hello\n":
            break
    return server, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", help="a postgresql:// URI of a database to use")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init.pow"
        init.write_text(
            "#!/bin/sh\nkapow route add /hello -c 'echo hello | kapow set /response/body'\n"
            "kapow route add /true -c true\n"
        )
        init.chmod(0o755)
        kinds: dict[str, str | None] = {"off": "off", "memory": None, "file": str(Path(tmp) / "h.sqlite3")}
        if args.postgres:
            kinds["postgres"] = args.postgres
        servers = {}
        try:
            for kind, history in kinds.items():
                servers[kind] = start(history, init)
            print(f"loadavg1_start {os.getloadavg()[0]:.2f} load")
            results: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.rounds):
                for kind, started in servers.items():
                    for route in ("hello", "true"):
                        results.setdefault((kind, route), []).append(
                            wrk(f"{started[1]}/{route}", args.duration)[0]
                        )
            for (kind, route), rates in sorted(results.items()):
                rates.sort()
                median = rates[len(rates) // 2]
                base = sorted(results[("off", route)])[len(rates) // 2]
                print(f"{route}.c8.rps.{kind} {median:.1f} req/s  {median / base:.3f} of off")
            print(f"loadavg1_end {os.getloadavg()[0]:.2f} load")
        finally:
            for server, _base in servers.values():
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(30)


if __name__ == "__main__":
    main()
