#!/usr/bin/env python3
"""
The server's CPU per data API call: a real ``kapow server`` with one handler
held open, ``wrk`` on one keep-alive connection for SECONDS against a read
(``GET /request/method``) and a write (``PUT /response/headers/X-A``) of that
handler, and for each the calls per second and the server's CPU time (user
and system, its own process) per call. ``--new-connections``: a connection
per call (``Connection: close``), as ``kapow get`` and ``kapow set`` make them.

Usage: python bench/bench_data.py [-d SECONDS] [--new-connections] [-- SERVER_ARGS...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.kapowserver import KapowServer, wait_for  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-d", type=int, default=5, help="seconds per call (default 5)")
    parser.add_argument("--new-connections", action="store_true", help="a connection per call")
    parser.add_argument("server_args", nargs="*", help="more options of kapow server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = KapowServer(work / "server", extra=("--shutdown-timeout", "0", *args.server_args))
        held = None
        try:
            server.add_route("/hold", f"echo $KAPOW_HANDLER_ID > {work}/id; sleep 600")
            held = subprocess.Popen(["curl", "-s", "-o", "/dev/null", server.user + "/hold"])
            handler = wait_for(lambda: (work / "id").exists() and (work / "id").read_text().strip())
            put = work / "put.lua"
            close = 'wrk.headers["Connection"] = "close"\n' if args.new_connections else ""
            put.write_text('wrk.method = "PUT"\nwrk.body = "v"\n' + close)
            get = work / "get.lua"
            get.write_text(close)
            pid = server.process.pid
            for call, script in (
                ("GET /request/method", ["-s", str(get)]),
                ("PUT /response/headers/X-A", ["-s", str(put)]),
            ):
                url = f"{server.data}/handlers/{handler}{call.split()[1]}"
                before = cpu_seconds(pid)
                out = subprocess.run(
                    ["wrk", "-t1", "-c1", f"-d{args.d}s", *script, url], capture_output=True, text=True
                ).stdout
                used = cpu_seconds(pid) - before
                lines = out.splitlines()
                calls = int(next(line for line in lines if " requests in " in line).split()[0])
                rate = next(line for line in lines if line.startswith("Requests/sec")).split()[1]
                print(f"{call:26} {rate:>10} calls/s  {used / calls * 1e6:6.1f} us server CPU per call")
        finally:
            if held is not None:
                held.kill()
                held.wait()
            server.stop()


if __name__ == "__main__":
    main()
