"""
The cost of the traffic policy (SPEC.md §13), by hand, never in the tests:

- ``true`` at ``wrk -c8`` on a route with a rate that never refuses, against
  the same route without one, alternating in the same minutes;
- the server's CPU per refused request (429), under a flood of them.

Usage: ``.venv/bin/python bench/bench_traffic.py [--duration S] [--rounds N] [--workers N]``.
It starts its own server on 127.0.0.1 ports it picks, and needs ``wrk``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KAPOW = str(Path(sys.executable).parent / "kapow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """The user and system CPU time a process has used (not its children's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def wrk(url: str, duration: float) -> tuple[float, int, dict[str, int]]:
    out = subprocess.run(
        ["wrk", "-t2", "-c8", f"-d{duration:g}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, total, {"non2xx": int(non2xx.group(1)) if non2xx else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    ports = [free_port() for _ in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init.pow"
        init.write_text(
            "#!/bin/sh\n"
            "kapow route add /plain -c true\n"
            "kapow route add /rated --rate 1000000/s -c true\n"
            "kapow route add /flood --rate 1/h -c true\n"
        )
        init.chmod(0o755)
        server = subprocess.Popen(
            [KAPOW, "server", "--bind", f"127.0.0.1:{ports[0]}", "--control-bind", f"127.0.0.1:{ports[1]}",
             "--data-bind", f"127.0.0.1:{ports[2]}", "--workers", str(args.workers), str(init)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{ports[0]}"
            for _ in range(100):
                time.sleep(0.1)
                done = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", base + "/flood"],
                                      capture_output=True, text=True).stdout  # fmt: skip
                if done == "200":
                    break
            print(f"loadavg1_start {os.getloadavg()[0]:.2f} load")
            plain, rated = [], []
            for _ in range(args.rounds):
                plain.append(wrk(base + "/plain", args.duration)[0])
                rated.append(wrk(base + "/rated", args.duration)[0])
            plain.sort()
            rated.sort()
            p, r = plain[len(plain) // 2], rated[len(rated) // 2]
            print(f"true.c8.rps.plain {p:.1f} req/s")
            print(f"true.c8.rps.rated {r:.1f} req/s")
            print(f"true.c8.rated_over_plain {r / p:.3f} ratio")
            # The server and its workers: the processes of its group started
            # with ``--worker N`` (the server's own ``--workers`` is not that).
            pids = [server.pid] + [
                int(line.split()[0]) for line in subprocess.run(
                    ["ps", "-o", "pid=,pgid=,args=", "-e"], capture_output=True, text=True
                ).stdout.splitlines() if line.split()[1] == str(server.pid) and "--worker" in line.split()[2:]
            ]  # fmt: skip
            before = sum(cpu_seconds(pid) for pid in pids)
            _rps, total, counts = wrk(base + "/flood", args.duration)
            after = sum(cpu_seconds(pid) for pid in pids)
            print(f"flood.requests {total} count")
            print(f"flood.refused {counts['non2xx']} count")
            print(f"flood.cpu_per_refusal {(after - before) / max(total, 1) * 1e6:.1f} us")
            print(f"loadavg1_end {os.getloadavg()[0]:.2f} load")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)


if __name__ == "__main__":
    main()
