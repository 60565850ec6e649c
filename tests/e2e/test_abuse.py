"""
The listeners under abuse, against a real server on loopback: slow and idle
connections time out while running handlers and ``kapow set`` streams are
never cut, a burst of connections is queued by the kernel, the connection
limit closes what is past it, and bad values of the options are refused.
With one worker and with ``--workers 2``.
"""

from __future__ import annotations

import resource
import select
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.kapowserver import KAPOW, KapowServer, curl, wait_for

WORKERS = pytest.mark.parametrize("workers", ["1", "2"])


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Read until the peer closes, at most ``seconds``: (closed, what came)."""
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], 0.05)
        if ready:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return True, received
            if not data:
                return True, received
            received += data
    return False, received


def trickle_headers(url: str, interval: float, seconds: float) -> tuple[bool, bytes, float]:
    """Send a request's headers one byte every ``interval``; (closed, answer, when)."""
    sock = socket.create_connection(address(url))
    start = time.monotonic()
    try:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n")
        for byte in b"X-Slow: " + b"a" * 100:
            try:
                sock.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return True, b"", time.monotonic() - start
            closed, answer = closed_within(sock, interval)
            if closed:
                return True, answer, time.monotonic() - start
            if time.monotonic() - start > seconds:
                break
        return False, b"", time.monotonic() - start
    finally:
        sock.close()


@WORKERS
def test_a_trickling_client_is_closed_while_normal_requests_work(tmp_path: Path, workers: str) -> None:
    server = KapowServer(tmp_path, extra=["--header-timeout", "1", "--workers", workers])
    try:
        server.add_route("/hello", "kapow set /response/body hello")
        for url in (server.user, server.data):
            closed, answer, when = trickle_headers(url, 0.2, 6)
            assert closed, f"{url}: a trickling client was not closed"
            assert when < 2.5, f"{url}: closed after {when:.1f}s"
            # 408, unless a byte sent as the server closed drew a reset that discarded it
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
        assert curl(server.user + "/hello").stdout == "hello"
        assert server.wait_log("user interface listening")
    finally:
        server.stop()


def test_a_body_trickling_below_the_rate_is_closed(tmp_path: Path) -> None:
    server = KapowServer(tmp_path, extra=["--header-timeout", "1", "--body-min-rate", "100"])
    try:
        server.add_route("/up", "kapow get /request/body | wc -c | kapow set /response/body", "-X", "POST")
        sock = socket.create_connection(address(server.user))
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < 8 and not closed:
            try:
                sock.send(b"x" * 10)  # 50 bytes/s: below 100
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            closed, _ = closed_within(sock, 0.2)
        assert closed and time.monotonic() - start < 4
        sock.close()
        # a body at a decent rate passes, however long it takes in all
        done = curl("-X", "POST", "--data-binary", "@-", server.user + "/up", input=b"y" * 300_000)
        assert done.stdout.strip() == b"300000"
    finally:
        server.stop()


@WORKERS
def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path, workers: str) -> None:
    server = KapowServer(tmp_path, extra=["--idle-timeout", "1", "--workers", workers])
    try:
        server.add_route("/hello", "kapow set /response/body hello")
        sock = socket.create_connection(address(server.user))
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        closed, answer = closed_within(sock, 6)
        assert closed, "an idle keep-alive connection stayed open"
        assert answer.startswith(b"HTTP/1.1 200 ") and b"hello" in answer
        sock.close()
        # the control API too, even before a TLS handshake
        sock = socket.create_connection(address(server.control))
        start = time.monotonic()
        closed, _ = closed_within(sock, 6)
        assert closed and time.monotonic() - start < 3
        sock.close()
    finally:
        server.stop()


@WORKERS
def test_running_handlers_and_set_streams_are_never_cut(tmp_path: Path, workers: str) -> None:
    server = KapowServer(
        tmp_path, extra=["--idle-timeout", "1", "--header-timeout", "1", "--workers", workers]
    )
    try:
        # a handler writing once every 3 s, each write a kapow set of its own
        server.add_route("/slow", "for i in 1 2; do echo $i | kapow set /response/stream; sleep 3; done")
        # one kapow set that keeps its data API connection between appends
        server.add_route(
            "/pauses", "(echo a; sleep 2.5; echo b; sleep 2.5; echo c) | kapow set /response/stream"
        )
        slow = subprocess.Popen(["curl", "-sS", "-N", server.user + "/slow"], stdout=subprocess.PIPE)
        pauses = curl("-N", server.user + "/pauses")
        assert pauses.returncode == 0, pauses.stderr
        assert pauses.stdout == "a\nb\nc\n"
        out, _ = slow.communicate(timeout=30)
        assert slow.returncode == 0 and out == b"1\n2\n"
    finally:
        server.stop()


def listen_backlogs(ports: set[int]) -> dict[int, int]:
    """The backlog of each listening TCP socket on ``ports``, as ``ss`` shows it (Send-Q)."""
    shown = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in shown.splitlines():
        fields = line.split()
        port = int(fields[3].rsplit(":", 1)[1])
        if port in ports:
            found[port] = int(fields[2])
    return found


@WORKERS
def test_listeners_use_the_systems_backlog_and_a_burst_is_queued(tmp_path: Path, workers: str) -> None:
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    server = KapowServer(tmp_path, extra=["--workers", workers])
    try:
        ports = {address(server.user)[1], address(server.control)[1], address(server.data)[1]}
        assert listen_backlogs(ports) == dict.fromkeys(ports, somaxconn)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1100 <= hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        socks = []
        try:
            start = time.monotonic()
            for _ in range(1000):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(address(server.user))
                socks.append(sock)
            pending = set(socks)
            while pending and time.monotonic() - start < 5:
                _, ready, _ = select.select([], list(pending)[:500], [], 0.05)
                pending.difference_update(ready)
            taken = time.monotonic() - start
            assert not pending, f"{len(pending)} of 1000 connections not accepted"
            # a dropped SYN is retried after a second: all came before that
            assert taken < 1.0, f"1000 connections took {taken:.2f}s"
        finally:
            for sock in socks:
                sock.close()
    finally:
        server.stop()
    backlog = KapowServer(tmp_path / "b", extra=["--backlog", "77"])
    try:
        ports = {address(backlog.user)[1], address(backlog.data)[1]}
        assert listen_backlogs(ports) == dict.fromkeys(ports, 77)
    finally:
        backlog.stop()


@WORKERS
def test_past_the_connection_limit_connections_are_closed_at_once(tmp_path: Path, workers: str) -> None:
    server = KapowServer(tmp_path, extra=["--max-connections", "2", "--workers", workers])
    try:
        server.add_route("/hello", "kapow set /response/body hello")
        server.wait_log(r"open files limit")
        # each worker holds up to 2: with two, which one accepts is the kernel's choice
        held: list[socket.socket] = []
        refused_at = None
        for n in range(2 * int(workers) + 1):
            sock = socket.create_connection(address(server.user))
            closed, _ = closed_within(sock, 0.5)
            if closed:
                sock.close()
                refused_at = n
                break
            held.append(sock)
        assert refused_at is not None, "every connection was kept"
        assert 2 <= refused_at <= 2 * int(workers)
        server.wait_log(r"user interface: \d+ connections closed at once: 2 are open")
        for sock in held:
            sock.close()
        wait_for(lambda: curl(server.user + "/hello").stdout == "hello", 10, "a free slot")
    finally:
        server.stop()


def test_the_open_files_limit_is_raised_and_logged(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    server = KapowServer(tmp_path)
    try:
        m = server.wait_log(r"open files limit: (\d+)")
        assert int(m.group(1)) == hard
        limits = Path(f"/proc/{server.process.pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3] == str(hard)
        assert soft <= hard
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--header-timeout", "0"),
        ("--idle-timeout", "-1"),
        ("--body-min-rate", "abc"),
        ("--backlog", "nan"),
        ("--max-connections", "1.5"),
    ],
)
def test_bad_values_are_one_line_errors(flag: str, value: str) -> None:
    result = subprocess.run([KAPOW, "server", flag, value], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stdout == ""
    assert (
        result.stderr
        == f"kapow server: {flag} must be a positive number, not {value!r} (see kapow server --help)\n"
    )
