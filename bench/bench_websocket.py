#!/usr/bin/env python3
"""
WebSocket routes against websocketd: a real ``kapow server`` (``--workers 1``)
with a route ``kapow route add --mode websocket --ping 0 /cat -c cat``, then
websocketd running ``cat`` (``websocketd --port=P --address=127.0.0.1 cat``),
one after the other on 127.0.0.1 ports picked here, each measured for

1. round trips of one-line messages through ``cat`` on one connection: send a
   line, wait for it to come back, repeat for SECONDS (msgs/s, and the
   server's own CPU time per round trip);
2. connections set up per second: connect, upgrade, the process started,
   ``x`` sent and back, close handshake; one client at a time, then 8 at
   once, for SECONDS each;
3. the server's memory per idle open connection: N connections (default
   1,000) opened (each echoes ``x`` once, so its process runs) and left idle;
   the server's own processes' RSS (``/proc/PID/status`` VmRSS, RssAnon) and
   PSS (``smaps_rollup``) at 0, N/2 and N connections, per connection; then
   the time from the client closing them all to the last handler gone. The
   server's own processes are those it runs while idle (ours: its main
   process, and helpers counted apart as ``helpers``). The handlers (ours:
   ``sh -c cat`` and its ``cat``; websocketd: ``cat``) are not counted in it;
   their PSS is shown apart. PSS moves with pages shared with other processes;
   RSS is the figure to read.

The client is this script's own: blocking sockets and a minimal RFC 6455
client (handshake, masked frames, pings answered), no extra packages.
Output: one figure per line, ``name value unit`` (as shared/bench/bench.sh),
the ratios ours/websocketd at the end; progress goes to stderr. The figures
are for reading, nothing is asserted. If websocketd is missing (Debian
package ``websocketd``), this tries ``apt-get install -y websocketd`` when run
as root, and says so when it cannot.

Usage: python bench/bench_websocket.py [--duration 5] [--connections 1000]
                                       [--only ours|websocketd] [-- SERVER_ARGS...]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import hashlib
import os
import random
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
KAPOW = str(VENV_BIN / "kapow") if (VENV_BIN / "kapow").exists() else str(ROOT / ".venv" / "bin" / "kapow")
HOST = "127.0.0.1"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONCURRENT = 8


def out(name: str, value: object, unit: str) -> None:
    if isinstance(value, float):
        value = f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    print(f"{name} {value} {unit}", flush=True)


def log(message: str) -> None:
    print(f"[bench_websocket] {message}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


# -------------------------------------------------------------- the client


class Closed(Exception):
    """The server closed the connection (a close frame or EOF)."""


class WebSocket:
    """A minimal blocking RFC 6455 client: text messages out (masked), messages in."""

    def __init__(self, port: int, path: str, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = base64.b64encode(random.randbytes(16))
            self.sock.sendall(
                b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                % (path.encode(), HOST.encode(), port, key)
            )
            self.buf = bytearray()
            while (end := self.buf.find(b"\r\n\r\n")) < 0:
                self._more()
            head = bytes(self.buf[:end]).split(b"\r\n")
            del self.buf[: end + 4]
            if head[0].split()[1:2] != [b"101"]:
                raise OSError(f"upgrade refused: {head[0].decode('latin-1')}")
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head[1:])
            }
            if headers.get(b"sec-websocket-accept") != accept:
                raise OSError("bad Sec-WebSocket-Accept")
        except BaseException:
            self.sock.close()
            raise

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise Closed("EOF")
        self.buf += data

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            self._more()

    def send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = random.randbytes(4)
        if n:
            key = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        self.sock.sendall(header + mask + payload)

    def send_text(self, text: str) -> None:
        self.send(0x1, text.encode())

    def frame(self) -> tuple[bool, int, bytes]:
        self._need(2)
        b0, b1 = self.buf[0], self.buf[1]
        n, at = b1 & 0x7F, 2
        if n == 126:
            self._need(4)
            (n,) = struct.unpack_from("!H", self.buf, 2)
            at = 4
        elif n == 127:
            self._need(10)
            (n,) = struct.unpack_from("!Q", self.buf, 2)
            at = 10
        mask = b""
        if b1 & 0x80:  # a server must not mask, but read it anyway
            self._need(at + 4)
            mask, at = bytes(self.buf[at : at + 4]), at + 4
        self._need(at + n)
        payload = bytes(self.buf[at : at + n])
        del self.buf[: at + n]
        if mask and n:
            key = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def receive(self) -> bytes:
        """The next text or binary message; pings answered, pongs skipped; :class:`Closed` on a close."""
        parts: list[bytes] = []
        while True:
            fin, opcode, payload = self.frame()
            if opcode == 0x9:
                self.send(0xA, payload)
            elif opcode == 0xA:
                continue
            elif opcode == 0x8:
                raise Closed(payload[:2].hex())
            else:
                parts.append(payload)
                if fin:
                    return b"".join(parts)

    def echo(self, text: str) -> None:
        self.send_text(text)
        got = self.receive()
        if got != text.encode():
            raise OSError(f"sent {text!r}, got {got[:40]!r}")

    def close(self, wait: bool = True) -> None:
        """Send a close frame (1000) and, with ``wait``, read until the server's close or EOF."""
        try:
            self.send(0x8, struct.pack("!H", 1000))
            while wait and self.frame()[1] != 0x8:
                pass
        except (OSError, Closed):
            pass
        finally:
            self.sock.close()


# ------------------------------------------------------------ the processes


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, start time) of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(pid: int, table: dict[int, tuple[int, int]] | None = None) -> list[int]:
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def status_kib(pid: int, *names: str) -> dict[str, int]:
    values = dict.fromkeys(names, 0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in values:
                values[key] = int(line.split()[1])
    except OSError:
        pass
    return values


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def runs_cat(pid: int) -> bool:
    """Whether ``pid`` is a handler of this benchmark's: ``cat`` or ``sh -c cat`` (or has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    comm, state = stat[stat.find(b"(") + 1 : stat.rfind(b")")], stat[stat.rfind(b")") + 2 :].split()[0]
    return comm == b"cat" or state == b"Z" or cmdline(pid).rstrip(b"\0").endswith(b"-c\0cat")


def open_files_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3]
    return "?"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Server:
    """A server started here, in a session (process group) of its own."""

    def __init__(
        self, name: str, argv: Sequence[str], port: int, path: str, work: Path, env: dict[str, str]
    ) -> None:
        self.name, self.port, self.path, self.work = name, port, path, work
        self.log = open(work / f"{name}.log", "wb")  # noqa: SIM115
        log(f"starting {name}: {' '.join(argv)}")
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.pid = self.process.pid
        self.own: set[int] = {self.pid}  # the server's processes (helpers it runs while idle)
        self.roles = {self.pid: "main"}

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self) -> str:
        self.log.flush()
        return (self.work / f"{self.name}.log").read_text(errors="replace")[-3000:]

    def wait_ready(self, ready: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{self.tail()}")
            if ready():
                try:
                    WebSocket(self.port, self.path, timeout=5).close()
                    return
                except (OSError, Closed):
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.tail()}")

    def handlers(self) -> list[int]:
        """Its children beside its own processes: one per open connection."""
        table = proc_table()
        return [pid for pid, (parent, _) in table.items() if parent == self.pid and pid not in self.own]

    def handler_processes(self) -> list[int]:
        """All the processes it runs beside its own (a handler may be a shell and its child)."""
        return [pid for pid in descendants(self.pid) if pid not in self.own]

    def settle(self, expected: int, timeout: float = 30.0) -> int:
        """Wait until it runs ``expected`` handlers (or ``timeout``); how many it runs."""
        deadline = time.monotonic() + timeout
        while (n := len(self.handlers())) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return n

    def role(self, pid: int) -> str:
        """A short name of one of its processes: main, or the helper's module or script."""
        if pid == self.pid:
            return "main"
        args = cmdline(pid).split(b"\0")
        for i, arg in enumerate(args):
            if arg == b"-m" and i + 1 < len(args):
                return args[i + 1].decode().rsplit(".", 1)[-1]
            if arg.endswith(b".py"):
                return Path(arg.decode()).stem
        return f"pid{pid}"

    def memory(self) -> dict[str, int]:
        """VmRSS, RssAnon, Pss (KiB) and open files of its own processes, summed, and VmRSS of each (rss.ROLE)."""
        total = {"VmRSS": 0, "RssAnon": 0, "Pss": 0, "fds": 0}
        for pid in sorted(self.own):
            values = status_kib(pid, "VmRSS", "RssAnon")
            for key, value in values.items():
                total[key] += value
            total[f"rss.{self.roles[pid]}"] = values["VmRSS"]
            total["Pss"] += pss_kib(pid)
            try:
                total["fds"] += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                pass
        return total

    def found_own(self) -> None:
        """
        Its own processes: itself and those it runs while idle, once the
        handlers of the connections made so far (``cat``, or ``sh -c cat``) are gone.
        """
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            found = descendants(self.pid)
            if not any(map(runs_cat, found)):
                break
            time.sleep(0.05)
        else:
            log(f"{self.name}: handlers still running at the start; counted as its own")
        self.own |= set(found)
        self.roles = {pid: self.role(pid) for pid in self.own}
        out(f"{self.name}.server_processes", len(self.own), "processes")
        log(
            f"{self.name}: own processes "
            + ", ".join(f"{pid} {role}" for pid, role in sorted(self.roles.items()))
        )

    def cpu(self) -> dict[str, float]:
        """CPU seconds of each of its own processes, by role."""
        return {self.roles[pid]: cpu_seconds(pid) for pid in self.own}

    def stop(self) -> None:
        """End it (its process group), then any process it started that outlived it."""
        if self.alive():
            table = proc_table()
            left = {pid: table[pid][1] for pid in descendants(self.pid, table)}
            # a graceful stop may wait for handlers: kapow server's --shutdown-timeout is 30 s
            for sig, wait in ((signal.SIGTERM, 45.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    log(f"{self.name} did not stop after {wait} s on {sig.name}")
            deadline = time.monotonic() + 5
            while left and time.monotonic() < deadline:
                table = proc_table()
                left = {pid: start for pid, start in left.items() if table.get(pid, (0, -1))[1] == start}
                time.sleep(0.05)
            for pid in left:  # the same processes still (same start time): its handlers' groups
                log(f"ending leftover process {pid} of {self.name}")
                try:
                    os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.process.wait()
        self.log.close()


def start_ours(work: Path, server_args: Sequence[str]) -> Server:
    port, control, data = free_ports(3)
    init = work / "init.sh"
    init.write_text(
        "#!/bin/sh\n"
        f"if kapow route add --mode websocket --ping 0 /cat -c cat >'{work}/init.log' 2>&1\n"
        f"then touch '{work}/init.done'; else touch '{work}/init.failed'; fi\n"
    )
    init.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{Path(KAPOW).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    for name in ("KAPOW_CONTROL_URL", "KAPOW_DATA_URL", "KAPOW_HANDLER_ID"):
        env.pop(name, None)
    argv = [
        KAPOW, "server",
        "--bind", f"{HOST}:{port}", "--control-bind", f"{HOST}:{control}", "--data-bind", f"{HOST}:{data}",
        *server_args, str(init),
    ]  # fmt: skip
    server = Server("ours", argv, port, "/cat", work, env)

    def ready() -> bool:
        if (work / "init.failed").exists():
            raise RuntimeError("init program failed:\n" + (work / "init.log").read_text())
        return (work / "init.done").exists()

    server.wait_ready(ready)
    # its own processes: those it runs while idle, once the init program is gone
    deadline = time.monotonic() + 10
    while (
        any(str(init).encode() in cmdline(pid) for pid in descendants(server.pid))
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    server.found_own()
    return server


def websocketd_path() -> str | None:
    found = shutil.which("websocketd")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    log("websocketd missing: apt-get install -y websocketd")
    subprocess.run(
        ["apt-get", "install", "-y", "websocketd"], stdout=sys.stderr, stderr=sys.stderr, check=False
    )
    return shutil.which("websocketd")


def start_websocketd(work: Path, binary: str) -> Server:
    (port,) = free_ports(1)
    argv = [binary, f"--port={port}", f"--address={HOST}", "cat"]
    server = Server("websocketd", argv, port, "/", work, dict(os.environ))
    server.wait_ready(lambda: True)
    server.found_own()
    return server


# --------------------------------------------------------------- measures


def cpu_figures(
    label: str, before: dict[str, float], after: dict[str, float], per: float, unit: str
) -> float:
    """Print the server's CPU per operation (``per`` operations, scaled to ``unit``), and by process if several."""
    used = {role: after.get(role, 0.0) - before.get(role, 0.0) for role in before}
    scale = {"us/msg": 1e6, "ms/conn": 1e3}[unit] / max(per, 1)
    total = sum(used.values()) * scale
    out(f"{label}.server_cpu", total, unit)
    if len(used) > 1:  # its helper processes (the rest is its main process's)
        out(f"{label}.server_cpu.helpers", (sum(used.values()) - used["main"]) * scale, unit)
    return total


def round_trips(server: Server, duration: float, name: str) -> dict[str, float]:
    ws = WebSocket(server.port, server.path)
    try:
        ws.echo("warm-up")
        warm_until = time.monotonic() + min(1.0, duration / 5)
        while time.monotonic() < warm_until:
            ws.echo("hello websocket")
        count, cpu0, client0 = 0, server.cpu(), time.process_time()
        start = time.perf_counter()
        until = start + duration
        while True:
            for _ in range(50):
                ws.echo("hello websocket")
            count += 50
            if time.perf_counter() >= until:
                break
        elapsed = time.perf_counter() - start
        cpu1, client_cpu = server.cpu(), time.process_time() - client0
    finally:
        ws.close()
    rate = count / elapsed
    out(f"{name}.roundtrip.rate", rate, "msg/s")
    out(f"{name}.roundtrip.latency_mean", 1e6 / rate, "us")
    cpu = cpu_figures(f"{name}.roundtrip", cpu0, cpu1, count, "us/msg")
    out(f"{name}.roundtrip.client_cpu", client_cpu / count * 1e6, "us/msg")
    return {"rate": rate, "cpu": cpu}


def one_connection(server: Server) -> None:
    ws = WebSocket(server.port, server.path)
    try:
        ws.echo("x")
    except BaseException:
        ws.close(wait=False)
        raise
    ws.close()


def connections(server: Server, duration: float, clients: int, name: str) -> dict[str, float]:
    server.settle(0)
    counts, errors = [0] * clients, [0] * clients
    first_error: list[str] = []
    start = time.perf_counter()
    until = start + duration
    cpu0 = server.cpu()

    def client(i: int) -> None:
        while time.perf_counter() < until:
            try:
                one_connection(server)
                counts[i] += 1
            except (OSError, Closed) as e:
                errors[i] += 1
                first_error.append(repr(e))
                time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    cpu1 = server.cpu()
    done = sum(counts)
    label = f"{name}.connect.{'seq' if clients == 1 else f'c{clients}'}"
    out(f"{label}.rate", done / elapsed, "conn/s")
    cpu = cpu_figures(label, cpu0, cpu1, done, "ms/conn")
    out(f"{label}.errors", sum(errors), "count")
    if first_error:
        log(f"{label}: first error {first_error[0]}")
    return {"rate": done / elapsed, "cpu": cpu}


def memory(server: Server, n: int, name: str) -> dict[str, float]:
    held: list[WebSocket] = []
    failures: list[str] = []
    server.settle(0)
    time.sleep(1)
    points = [(0, server.memory())]
    out(f"{name}.mem.open_files_limit", open_files_limit(server.pid), "files")

    def open_one(_: int) -> WebSocket | None:
        try:
            ws = WebSocket(server.port, server.path, timeout=60)
        except (OSError, Closed) as e:
            failures.append(repr(e))
            return None
        try:
            ws.echo("x")  # its process runs
        except (OSError, Closed) as e:
            failures.append(repr(e))
            ws.close(wait=False)
            return None
        return ws

    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for target in (n // 2, n):
                started = time.monotonic()
                held += [ws for ws in pool.map(open_one, range(target - len(held))) if ws]
                log(f"{name}: {len(held)} connections open ({time.monotonic() - started:.1f} s)")
                running = server.settle(len(held), 10)
                time.sleep(1)
                points.append((len(held), server.memory()))
                if running != len(held):
                    log(f"{name}: {running} handlers running for {len(held)} connections")
        processes = server.handler_processes()
        handler_pss = sum(pss_kib(pid) for pid in processes)
        out(f"{name}.mem.opened", len(held), "conn")
        out(f"{name}.mem.open_errors", len(failures), "count")
        if failures:
            log(f"{name}: first open error {failures[0]}")
        for count, m in points:
            out(f"{name}.mem.rss_at_{count}", m["VmRSS"], "KiB")
        for count, m in points:
            out(f"{name}.mem.pss_at_{count}", m["Pss"], "KiB")
        (_, m0), (n1, m1), (n2, m2) = points
        result: dict[str, float] = {}
        if n2 > 0:
            for key, label in (("VmRSS", "rss"), ("Pss", "pss"), ("RssAnon", "rss_anon")):
                result[label] = (m2[key] - m0[key]) / n2
                out(f"{name}.mem.{label}_per_conn", result[label], "KiB/conn")
            if n2 > n1:
                out(
                    f"{name}.mem.rss_per_conn_second_half",
                    (m2["VmRSS"] - m1["VmRSS"]) / (n2 - n1),
                    "KiB/conn",
                )
            helpers = [key for key in m0 if key.startswith("rss.") and key != "rss.main"]
            if helpers:  # the rest is its main process's
                grown = sum(m2[key] - m0[key] for key in helpers)
                out(f"{name}.mem.rss_per_conn.helpers", grown / n2, "KiB/conn")
            out(f"{name}.mem.fds_per_conn", (m2["fds"] - m0["fds"]) / n2, "fds/conn")
            out(f"{name}.mem.handler_processes_per_conn", len(processes) / n2, "processes/conn")
            out(f"{name}.mem.handler_pss_per_conn", handler_pss / n2, "KiB/conn")
    finally:
        closing = time.perf_counter()
        for ws in held:
            ws.close(wait=False)
    # the client's side is closed at once: how long the server takes to end their handlers
    left = server.settle(0, 120)
    out(f"{name}.mem.all_handlers_gone_after_close", time.perf_counter() - closing, "s")
    time.sleep(1)
    out(f"{name}.mem.rss_after_close", server.memory()["VmRSS"], "KiB")
    if left:
        log(f"{name}: {left} handlers still running 120 s after the close")
    return result


def bench(server: Server, args: argparse.Namespace) -> dict[str, float]:
    name = server.name
    out(f"{name}.loadavg1_start", loadavg(), "load")
    results: dict[str, float] = {}
    log(f"{name}: round trips, {args.duration} s")
    r = round_trips(server, args.duration, name)
    results["roundtrip"], results["roundtrip_cpu"] = r["rate"], r["cpu"]
    for clients in (1, CONCURRENT):
        log(f"{name}: connections, {clients} client(s), {args.duration} s")
        r = connections(server, args.duration, clients, name)
        results[f"connect_{clients}"], results[f"connect_{clients}_cpu"] = r["rate"], r["cpu"]
    log(f"{name}: memory, {args.connections} idle connections")
    for key, value in memory(server, args.connections, name).items():
        results[f"mem_{key}"] = value
    out(f"{name}.alive_at_end", int(server.alive()), "bool")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5, help="seconds per throughput run (default 5)")
    parser.add_argument(
        "--connections", type=int, default=1000, help="idle connections held open (default 1000)"
    )
    parser.add_argument("--only", choices=("ours", "websocketd"), help="measure only this server")
    parser.add_argument("server_args", nargs="*", help="more options of kapow server")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < args.connections + 100:
        log(f"open files limit {want} is low for {args.connections} connections")

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)

    out("nproc", os.cpu_count(), "cores")
    out("loadavg1_start", loadavg(), "load")
    out("client_open_files_limit", resource.getrlimit(resource.RLIMIT_NOFILE)[0], "files")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="kapow-bench-ws.") as tmp:
        work = Path(tmp)
        if args.only in (None, "ours"):
            (work / "ours").mkdir()
            server = None
            try:
                server = start_ours(work / "ours", ["--workers", "1", *args.server_args])
                results["ours"] = bench(server, args)
            finally:
                if server is not None:
                    server.stop()
        if args.only in (None, "websocketd"):
            binary = websocketd_path()
            if binary is None:
                log("websocketd is not installed and could not be installed (apt-get install -y websocketd)")
                out("websocketd.available", 0, "bool")
            else:
                out("websocketd.available", 1, "bool")
                (work / "websocketd").mkdir()
                server = None
                try:
                    server = start_websocketd(work / "websocketd", binary)
                    results["websocketd"] = bench(server, args)
                finally:
                    if server is not None:
                        server.stop()
    out("loadavg1_end", loadavg(), "load")
    if "ours" in results and "websocketd" in results:
        ours, theirs = results["ours"], results["websocketd"]
        for key, label in (
            ("roundtrip", "roundtrip.rate"),
            ("roundtrip_cpu", "roundtrip.server_cpu"),
            ("connect_1", "connect.seq.rate"),
            ("connect_1_cpu", "connect.seq.server_cpu"),
            (f"connect_{CONCURRENT}", f"connect.c{CONCURRENT}.rate"),
            (f"connect_{CONCURRENT}_cpu", f"connect.c{CONCURRENT}.server_cpu"),
            ("mem_rss", "mem.rss_per_conn"),
            ("mem_pss", "mem.pss_per_conn"),
        ):
            if key in ours and key in theirs and theirs[key]:
                out(f"ratio.{label}", ours[key] / theirs[key], "ours/websocketd")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
