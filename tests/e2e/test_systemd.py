"""
Running under systemd: notifications to the service manager, and socket
activation, with real datagram sockets and a real server started the way
systemd starts a socket-activated service.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from kapow.server.systemd import (
    SERVICE_VARIABLES,
    child_environ,
    notify,
    watchdog_interval,
    watchdog_service,
)
from tests.support.kapowserver import KAPOW, TWIST, KapowServer, curl, write_program

# What systemd does before it executes a socket-activated service: the
# listening sockets become descriptors 3, 4, ... in the order of their names,
# and LISTEN_PID names the process that runs the service.
# argv: NAMES (colon-separated) FD... PROGRAM ARG...
_ACTIVATE = r"""
import fcntl, os, sys
names = sys.argv[1]
count = len(names.split(":"))
moved = [fcntl.fcntl(int(fd), fcntl.F_DUPFD_CLOEXEC, 100) for fd in sys.argv[2 : 2 + count]]
for index, fd in enumerate(moved):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(count), LISTEN_FDNAMES=names, LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2 + count], sys.argv[2 + count :])
"""


@pytest.fixture
def datagram_socket() -> Iterator[tuple[str, socket.socket]]:
    """A bound AF_UNIX datagram socket and its path (short: addresses hold 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="kapow-notify-") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            yield path, sock


def receive_until(sock: socket.socket, wanted: bytes, timeout: float = 10.0) -> list[bytes]:
    """Datagrams received until one holds the line ``wanted``; fail after ``timeout``."""
    received: list[bytes] = []
    deadline = time.monotonic() + timeout
    while wanted not in (line for datagram in received for line in datagram.split(b"\n")):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {wanted!r} within {timeout}s; received {received!r}")
        sock.settimeout(left)
        try:
            received.append(sock.recv(4096))
        except TimeoutError:
            pass
    return received


def pending(sock: socket.socket) -> list[bytes]:
    """Datagrams already queued on ``sock``."""
    sock.setblocking(False)
    received = []
    while True:
        try:
            received.append(sock.recv(4096))
        except BlockingIOError:
            return received


# -- notify ----------------------------------------------------------------------


def test_notify_sends_the_state_as_one_datagram(
    datagram_socket: tuple[str, socket.socket],
) -> None:
    path, sock = datagram_socket
    assert notify("READY=1\nSTATUS=serving", {"NOTIFY_SOCKET": path}) is True
    assert pending(sock) == [b"READY=1\nSTATUS=serving"]


def test_notify_reaches_an_abstract_namespace_socket() -> None:
    name = f"kapow-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert pending(sock) == [b"STOPPING=1"]


def test_notify_reads_os_environ_by_default(
    datagram_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sock = datagram_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("WATCHDOG=1") is True
    assert pending(sock) == [b"WATCHDOG=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify("WATCHDOG=1") is False


def test_notify_without_a_reachable_socket_returns_false(tmp_path: Path) -> None:
    closed = str(tmp_path / "closed")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
        gone.bind(closed)
    for environ in (
        {},
        {"NOTIFY_SOCKET": ""},
        {"NOTIFY_SOCKET": "relative/notify"},
        {"NOTIFY_SOCKET": str(tmp_path / "missing")},
        {"NOTIFY_SOCKET": closed},
        {"NOTIFY_SOCKET": f"@kapow-nobody-{uuid.uuid4().hex}"},
    ):
        assert notify("READY=1", environ) is False, environ


# -- watchdog --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "self"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
    ],
)
def test_watchdog_interval_is_half_the_period(environ: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval(environ) == interval


def test_watchdog_service_pings_while_running(
    datagram_socket: tuple[str, socket.socket],
) -> None:
    path, sock = datagram_socket
    environ = {
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    clock = Clock()
    service = watchdog_service(clock, environ)
    environ.clear()  # read at creation: the server may drop them from its environment
    service.startService()
    assert pending(sock) == [b"WATCHDOG=1"]
    clock.advance(0.9)
    assert pending(sock) == []
    clock.advance(0.1)
    assert pending(sock) == [b"WATCHDOG=1"]
    service.stopService()
    clock.advance(5)
    assert pending(sock) == []


def test_no_watchdog_service_when_systemd_does_not_watch() -> None:
    assert watchdog_service(Clock(), {"NOTIFY_SOCKET": "/run/systemd/notify"}) is None


def test_child_environ_drops_what_systemd_gave_the_server() -> None:
    environ = {name: "x" for name in SERVICE_VARIABLES} | {
        "PATH": "/bin",
        "LISTEN": "kept",
    }
    assert child_environ(environ) == {"PATH": "/bin", "LISTEN": "kept"}


# -- socket activation -------------------------------------------------------------


class SocketActivatedServer(KapowServer):
    """
    A server started as systemd starts a socket-activated service.

    :param sockets: listening sockets by ``FileDescriptorName``, in order.
    :param command: the server's command line before its flags.
    :param args: the server's flags and init programs.
    """

    def __init__(
        self,
        tmp: Path,
        sockets: Mapping[str, socket.socket],
        args: Sequence[str],
        command: Sequence[str] = (KAPOW, "server"),
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.creds = tmp / "creds"
        fds = [sock.fileno() for sock in sockets.values()]
        argv = [
            sys.executable, "-c", _ACTIVATE, ":".join(sockets), *map(str, fds), *command,
            "--write-control-credentials", str(self.creds), *args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAPOW_", "LISTEN_", "NOTIFY_"))}
        self.launch(argv, env, pass_fds=fds)


@pytest.fixture
def loopback_sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two listening TCP sockets on 127.0.0.1, on ports the kernel picked."""
    with (
        socket.create_server(("127.0.0.1", 0)) as user,
        socket.create_server(("127.0.0.1", 0)) as control,
    ):
        yield user, control


@pytest.fixture
def activated() -> Iterator[list[SocketActivatedServer]]:
    servers: list[SocketActivatedServer] = []
    yield servers
    for server in servers:
        server.stop()


def port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one process", "two workers"])
def test_inherited_sockets_serve_user_http_and_control_mtls(
    activated: list[SocketActivatedServer],
    loopback_sockets: tuple[socket.socket, socket.socket],
    tmp_path: Path,
    workers: tuple[str, ...],
) -> None:
    user, control = loopback_sockets
    init = write_program(
        tmp_path / "init.pow",
        "#!/bin/sh\nkapow route add /hi -c 'kapow set /response/body hi'\n",
    )
    server = SocketActivatedServer(
        tmp_path / "server",
        {"user": user, "control": control},
        [
            "--bind", "systemd:domain=INET:name=user",
            "--control-bind", "systemd:domain=INET:name=control",
            "--data-bind", "127.0.0.1:0",
            "--control-reachable-addr", f"127.0.0.1:{port(control)}",
            *workers,
            init,
        ],
    )  # fmt: skip
    activated.append(server)
    assert server.user == f"http://127.0.0.1:{port(user)}"
    assert server.control == f"https://127.0.0.1:{port(control)}"
    user.close()
    control.close()

    missing = curl("-o", "/dev/null", "-w", "%{http_code}", server.user + "/nothing")
    assert missing.stdout == "404"

    server.wait_log(r"init\.pow exited with status 0")
    assert curl(server.user + "/hi").stdout == "hi"
    routes = server.curl_control(server.control + "/routes")
    assert [r["url_pattern"] for r in json.loads(routes.stdout)] == ["/hi"], routes.stderr

    no_cert = curl("--cacert", str(server.creds / "server.crt"), server.control + "/routes")
    assert no_cert.returncode != 0 and no_cert.stdout == ""


def test_twist_kapow_adopts_the_sockets_the_unit_files_name(
    activated: list[SocketActivatedServer],
    loopback_sockets: tuple[socket.socket, socket.socket],
    tmp_path: Path,
) -> None:
    user, control = loopback_sockets
    server = SocketActivatedServer(
        tmp_path,
        {"kapow-user": user, "kapow-control": control},
        [
            "--bind", "systemd:domain=INET:name=kapow-user",
            "--control-bind", "systemd:domain=INET:name=kapow-control",
            "--data-bind", "127.0.0.1:0",
            "--control-reachable-addr", f"127.0.0.1:{port(control)}",
        ],
        command=(TWIST, "--log-format=text", "kapow"),
    )  # fmt: skip
    activated.append(server)
    assert (server.user, server.control) == (
        f"http://127.0.0.1:{port(user)}",
        f"https://127.0.0.1:{port(control)}",
    )
    health = server.curl_control(server.control + "/health")
    assert json.loads(health.stdout) == {"status": "ok", "routes": 0, "handlers": 0}, health.stderr


@pytest.mark.parametrize(
    "bind",
    [
        "systemd:domain=INET:name=user",
        "systemd:domain=INET:index=0",
    ],
)
def test_a_socket_systemd_did_not_pass_stops_the_start_with_one_line(bind: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    result = subprocess.run(
        [KAPOW, "server", "--bind", bind, "--control-bind", "127.0.0.1:0", "--data-bind", "127.0.0.1:0"],
        check=False, capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith(f"kapow server: --bind {bind}: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_the_server_notifies_ready_and_stopping(
    datagram_socket: tuple[str, socket.socket], tmp_path: Path
) -> None:
    path, sock = datagram_socket
    server = KapowServer(tmp_path, env={**os.environ, "NOTIFY_SOCKET": path})
    try:
        receive_until(sock, b"READY=1")
        server.process.send_signal(signal.SIGTERM)
        receive_until(sock, b"STOPPING=1")
        assert server.process.wait(15) == 0
    finally:
        server.stop()


def test_with_workers_ready_comes_once_every_worker_serves(
    datagram_socket: tuple[str, socket.socket], tmp_path: Path
) -> None:
    path, sock = datagram_socket
    server = KapowServer(tmp_path, extra=("--workers", "2"), env={**os.environ, "NOTIFY_SOCKET": path})
    try:
        receive_until(sock, b"READY=1")
        server.wait_log(r"worker 1 serves \(", timeout=2)
        server.wait_log(r"worker 2 serves \(", timeout=2)
        server.process.send_signal(signal.SIGTERM)
        received = receive_until(sock, b"STOPPING=1")
        assert server.process.wait(15) == 0
        assert b"READY=1" not in b"\n".join(received + pending(sock))  # once, from the main process
    finally:
        server.stop()
