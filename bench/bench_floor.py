#!/usr/bin/env python3
"""
The headroom of the ``hello`` route (``echo hello | kapow set /response/body``):
the least a twisted.web server can do for it, against ``kapow server`` and,
with ``--reference``, the Go reference, in alternating rounds of ``wrk`` at
one concurrency, so that all three meet the same machine.

The floor server does only this: a twisted.web leaf that spawns the route's
``/bin/sh -c`` through :class:`kapow.handlers.fast_processes.FastProcesses` (in
a thread while another handler lives, as ``kapow server`` does), a plain
Protocol on the data port that writes each PUT's body to the waiting request
and answers 200, and the response finished when the process's protocol hears
it exited (through its pidfd). No access log,
limits, timeouts, back-pressure, response state or error handling: what is
left is twisted.web, the reactor and the processes.

Usage: python bench/bench_floor.py [--rounds 3] [--seconds 4] [-c 8] [--reference PATH]
       python bench/bench_floor.py --serve USER_PORT DATA_PORT   (the floor server alone)

Needs ``wrk`` and the native client (``pip install -e .`` with a C compiler).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_startup import VENV_BIN, free_port, wait_route

HELLO = "echo hello | kapow set /response/body"


def serve(user_port: int, data_port: int) -> None:
    """Run the floor server until SIGTERM."""
    from twisted.internet import protocol, reactor
    from twisted.web import resource, server

    from kapow.commands.launcher import native_client
    from kapow.handlers.fast_processes import FastProcesses
    from kapow.handlers.processes import Environ

    client = native_client()
    if client is None:
        sys.exit("bench_floor: the native client was not built")
    processes = FastProcesses(reactor)
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    stdio = {0: devnull, 1: devnull, 2: devnull}
    environ = {**os.environ, "KAPOW_DATA_URL": f"http://127.0.0.1:{data_port}"}
    environ["PATH"] = os.path.dirname(client) + os.pathsep + environ.get("PATH", os.defpath)
    base = Environ(environ)
    argv = ["/bin/sh", "-c", HELLO]
    waiting: dict[bytes, Any] = {}

    class Exited(protocol.ProcessProtocol):
        def __init__(self, handler_id: bytes) -> None:
            self.handler_id = handler_id

        def processExited(self, reason: Any) -> None:
            waiting.pop(self.handler_id).finish()

    class Hello(resource.Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> Any:
            handler_id = secrets.token_hex(16)
            waiting[handler_id.encode()] = request
            env = base.adding("KAPOW_HANDLER_ID", handler_id)
            processes.spawnProcess(Exited(handler_id.encode()), argv[0], argv, env, childFDs=stdio)
            return server.NOT_DONE_YET

    class Data(protocol.Protocol):
        received = b""

        def dataReceived(self, data: bytes) -> None:
            self.received += data
            while (end := self.received.find(b"\r\n\r\n")) >= 0:
                head = self.received[:end].split(b"\r\n")
                length = 0
                for line in head[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                if len(self.received) < end + 4 + length:
                    return
                body = self.received[end + 4 : end + 4 + length]
                self.received = self.received[end + 4 + length :]
                waiting[head[0].split(b" ")[1].split(b"/")[2]].write(body)
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    data = protocol.Factory()
    data.protocol = Data
    reactor.listenTCP(user_port, server.Site(Hello()), interface="127.0.0.1")
    reactor.listenTCP(data_port, data, interface="127.0.0.1")
    reactor.run()


def start(argv: list[str], user_port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    wait_route(user_port, "/hello", time.monotonic() + 60)
    return process


def rps(url: str, seconds: int, connections: int) -> float:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}", url], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", nargs=2, type=int, metavar=("USER_PORT", "DATA_PORT"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("-c", type=int, default=8, help="connections")
    parser.add_argument("--reference", help="path of the Go reference kapow binary")
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    init = work / "hello.pow"
    init.write_text(f"#!/bin/sh\nkapow route add /hello -c '{HELLO}'\n")
    init.chmod(0o755)
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        user = free_port()
        servers["floor"] = (
            start([sys.executable, __file__, "--serve", str(user), str(free_port())], user),
            user,
        )
        user = free_port()
        ours = [str(VENV_BIN / "kapow"), "server", "--bind", f"127.0.0.1:{user}"]
        ours += ["--control-bind", f"127.0.0.1:{free_port()}", "--data-bind", f"127.0.0.1:{free_port()}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAPOW_")}
        servers["kapow server"] = (start([*ours, str(init)], user, env), user)
        if args.reference:
            bindir = work / "ref-bin"
            bindir.mkdir()
            (bindir / "kapow").symlink_to(os.path.abspath(args.reference))
            user, control = free_port(), free_port()
            ref = [args.reference, "server", "--bind", f"127.0.0.1:{user}"]
            ref += [
                "--control-bind",
                f"127.0.0.1:{control}",
                "--control-reachable-addr",
                f"127.0.0.1:{control}",
            ]
            ref += ["--data-bind", f"127.0.0.1:{free_port()}", str(init)]
            ref_env = {**env, "PATH": f"{bindir}{os.pathsep}{env.get('PATH', os.defpath)}"}
            servers["reference (Go)"] = (start(ref, user, ref_env), user)

        print(f"hello route, wrk -c{args.c}, {args.seconds} s a run, requests/s")
        print("round  " + "".join(f"{name:>16}" for name in servers))
        for number in range(1, args.rounds + 1):
            found = {
                name: rps(f"http://127.0.0.1:{port}/hello", args.seconds, args.c)
                for name, (_, port) in servers.items()
            }
            line = f"{number:5}  " + "".join(f"{value:16.1f}" for value in found.values())
            if "reference (Go)" in found:
                base = found["reference (Go)"]
                line += "   ours/ref {:.2f}  floor/ref {:.2f}".format(
                    found["kapow server"] / base, found["floor"] / base
                )
            print(line, flush=True)
    finally:
        for process, _ in servers.values():
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()


if __name__ == "__main__":
    main()
