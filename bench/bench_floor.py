#!/usr/bin/env python3
"""
The headroom of a route (``hello``: ``echo hello | kapow set /response/body``,
or ``true``): the least a twisted.web server can do for it, against ``kapow
server`` and, with ``--reference``, the Go reference, in alternating rounds of
``wrk`` at one concurrency, or with ``--sequential N`` in N alternating
rounds of one ``curl`` each (the median of ``time_total``, as
``../shared/bench/bench.sh`` measures ``*.seq.median``), so that all meet the
same machine.

The floor server (``web``) does only this: a twisted.web leaf that spawns the route's
``/bin/sh -c`` through :class:`kapow.handlers.fast_processes.FastProcesses` (in
a thread while another handler lives, as ``kapow server`` does), a plain
Protocol on the data port that writes each PUT's body to the waiting request
and answers 200, and the response finished when the process's protocol hears
it exited (through its pidfd). No access log,
limits, timeouts, back-pressure, response state or error handling: what is
left is twisted.web, the reactor and the processes.

Beneath it, with ``--floors``, two floors that are not HTTP servers, for a
route that writes nothing (``true``): ``protocol``, a bare Twisted Protocol that
spawns the same way once it has read a request's head and answers a fixed
empty 200 when the process exits (the reactor and the processes, without
twisted.web); and ``blocking``, a loop without a reactor that accepts, reads,
spawns, waits and answers, one request at a time (the processes alone).

Usage: python bench/bench_floor.py [--route hello|true] [--rounds 3] [--seconds 4] [-c 8]
                                   [--sequential N] [--floors] [--reference PATH]
       python bench/bench_floor.py --serve KIND USER_PORT DATA_PORT [--route R]   (a floor alone)

Needs ``wrk`` (``curl`` for ``--sequential``) and the native client (``pip
install -e .`` with a C compiler).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import sequential
from bench_startup import VENV_BIN, free_port, wait_route

#: The routes it measures: their paths and commands.
ROUTES = {"hello": "echo hello | kapow set /response/body", "true": "true"}

#: The floors ``--serve`` runs: twisted.web's, and the two beneath it (``--floors``).
FLOORS = ("web", "protocol", "blocking")

#: An empty 200: the data port's answer to a call, and the floors' beneath twisted.web to a request.
EMPTY_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def serve(kind: str, user_port: int, data_port: int, command: str) -> None:
    """Run the floor ``kind`` (:data:`FLOORS`) of ``command`` until SIGTERM."""
    if kind == "blocking":
        serve_blocking(user_port, command)
        return
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
    argv = ["/bin/sh", "-c", command]
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
                self.transport.write(EMPTY_ANSWER)

    class Answered(protocol.ProcessProtocol):
        def __init__(self, transport: Any) -> None:
            self.user = transport

        def processExited(self, reason: Any) -> None:
            self.user.write(EMPTY_ANSWER)

    class Bare(protocol.Protocol):
        head = b""

        def dataReceived(self, data: bytes) -> None:
            self.head += data
            if b"\r\n\r\n" in self.head:
                self.head = b""
                env = base.adding("KAPOW_HANDLER_ID", secrets.token_hex(16))
                processes.spawnProcess(Answered(self.transport), argv[0], argv, env, childFDs=stdio)

    data = protocol.Factory()
    data.protocol = Data
    user = server.Site(Hello()) if kind == "web" else protocol.Factory.forProtocol(Bare)
    reactor.listenTCP(user_port, user, interface="127.0.0.1")
    reactor.listenTCP(data_port, data, interface="127.0.0.1")
    reactor.run()


def serve_blocking(user_port: int, command: str) -> None:
    """The ``blocking`` floor: one request at a time, no reactor, until SIGTERM."""
    listener = socket.create_server(("127.0.0.1", user_port), backlog=128)
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    stdio = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
    argv = ["/bin/sh", "-c", command]
    while True:
        connection, _ = listener.accept()
        with connection:
            head = b""
            while b"\r\n\r\n" not in head:
                received = connection.recv(65536)
                if not received:
                    break
                head += received
            else:
                env = {**os.environ, "KAPOW_HANDLER_ID": secrets.token_hex(16)}
                pid = os.posix_spawn(argv[0], argv, env, file_actions=stdio, setpgroup=0)
                os.waitpid(pid, 0)
                connection.sendall(EMPTY_ANSWER)
                while connection.recv(65536):  # the client closes first, as it does with the others
                    pass


def start(
    argv: list[str], user_port: int, path: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    wait_route(user_port, path, time.monotonic() + 60)
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
    parser.add_argument("--serve", nargs=3, metavar=("KIND", "USER_PORT", "DATA_PORT"))
    parser.add_argument("--route", choices=sorted(ROUTES), default="hello")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("-c", type=int, default=8, help="connections")
    parser.add_argument(
        "--sequential", type=int, metavar="N", help="N rounds of one curl each instead of wrk"
    )
    parser.add_argument(
        "--floors", action="store_true", help="also the floors beneath twisted.web (route true)"
    )
    parser.add_argument("--reference", help="path of the Go reference kapow binary")
    args = parser.parse_args()
    command = ROUTES[args.route]
    if args.serve:
        kind, user_port, data_port = args.serve
        if kind not in FLOORS:
            parser.error(f"--serve: KIND is one of {', '.join(FLOORS)}")
        if kind != "web" and args.route != "true":
            parser.error(f"--serve {kind}: it answers nothing a handler writes: --route true")
        serve(kind, int(user_port), int(data_port), command)
        return
    if args.floors and args.route != "true":
        parser.error("--floors: the floors beneath twisted.web answer nothing: --route true")

    path = f"/{args.route}"
    work = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    init = work / "routes.pow"
    init.write_text(f"#!/bin/sh\nkapow route add {path} -c '{command}'\n")
    init.chmod(0o755)
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for kind in FLOORS if args.floors else FLOORS[:1]:
            user = free_port()
            floor = [sys.executable, __file__, "--route", args.route, "--serve", kind, str(user)]
            floor.append(str(free_port()))
            servers["floor" if kind == "web" else kind] = (start(floor, user, path), user)
        user = free_port()
        ours = [str(VENV_BIN / "kapow"), "server", "--bind", f"127.0.0.1:{user}"]
        ours += ["--control-bind", f"127.0.0.1:{free_port()}", "--data-bind", f"127.0.0.1:{free_port()}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAPOW_")}
        servers["kapow server"] = (start([*ours, str(init)], user, path, env), user)
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
            servers["reference (Go)"] = (start(ref, user, path, ref_env), user)

        if args.sequential:
            urls = {name: f"http://127.0.0.1:{port}{path}" for name, (_, port) in servers.items()}
            medians = sequential(urls, args.sequential)
            base = medians.get("reference (Go)")
            print(f"{args.route} route, {args.sequential} sequential requests each, median ms (and /ref)")
            for name, median in medians.items():
                print(f"{name:>16} {median:8.3f}" + (f"   {median / base:.2f}" if base else ""))
            return
        print(f"{args.route} route, wrk -c{args.c}, {args.seconds} s a run, requests/s")
        print("round  " + "".join(f"{name:>16}" for name in servers))
        for number in range(1, args.rounds + 1):
            found = {
                name: rps(f"http://127.0.0.1:{port}{path}", args.seconds, args.c)
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
