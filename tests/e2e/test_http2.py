"""
HTTP/2 by ALPN on the HTTPS user interface, and SIGHUP reloading the
certificate and the routes' auth files: a real server (alone and with
--workers 2), curl, and certificates made by tests.support.pki.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.kapowserver import KapowServer, curl, group_members, read_int, wait_for
from tests.support.pki import PKI, make_pki


@pytest.fixture(params=[(), ("--workers", "2")], ids=["one", "workers"])
def https(request: Any, start_server: Any, tmp_path: Path) -> tuple[KapowServer, PKI, str]:
    pki = make_pki(tmp_path)
    live = tmp_path / "live"
    live.mkdir()
    certfile, keyfile = live / "cert.pem", live / "key.pem"
    certfile.write_bytes(pki.server_chain.read_bytes())
    keyfile.write_bytes(pki.server_key.read_bytes())
    server = start_server(extra=("--certfile", str(certfile), "--keyfile", str(keyfile), *request.param))
    return server, pki, server.user.replace("127.0.0.1", "localhost")


def test_curl_http2_negotiates_h2_and_streams(https: Any, tmp_path: Path) -> None:
    server, pki, base = https
    gate = tmp_path / "gate"
    server.add_route("/v", "kapow get /request/version | kapow set /response/body")
    server.add_route(
        "/stream",
        "echo first | kapow set /response/stream; "
        f"n=0; while [ ! -e {gate} ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done; "
        "echo second | kapow set /response/stream",
    )
    result = curl("--http2", "--cacert", str(pki.ca), "-w", " %{http_version}", base + "/v")
    assert result.stdout == "HTTP/2.0 2", result.stderr
    assert curl("--http1.1", "--cacert", str(pki.ca), "-w", " %{http_version}", base + "/v").stdout == (
        "HTTP/1.1 1.1"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CURL_CA_BUNDLE", "SSL_CERT_FILE")}
    client = subprocess.Popen(
        ["curl", "-sS", "-N", "--http2", "--cacert", str(pki.ca), base + "/stream"],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert client.stdout is not None
        # the handler writes its second line only once the first one reached the client
        assert client.stdout.readline() == b"first\n"
        gate.touch()
        assert client.stdout.readline() == b"second\n"
        assert client.wait(10) == 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def test_a_client_that_leaves_over_h2_ends_its_handler(https: Any, tmp_path: Path) -> None:
    server, pki, base = https
    pidfile = tmp_path / "pgid"
    server.add_route("/hang", f"echo $$ > {pidfile}; sleep 1000 & sleep 1000")
    result = curl("--http2", "--cacert", str(pki.ca), "--max-time", "1", base + "/hang")
    assert result.returncode == 28  # curl's own timeout: it hung up
    pgid = read_int(pidfile)
    try:
        wait_for(lambda: not group_members(pgid), 10, "the handler's group to end")
        server.wait_log(r"client disconnected: ending its process group")
    finally:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sighup_serves_a_new_certificate_and_keeps_the_old_one_when_the_new_is_broken(
    https: Any, tmp_path: Path
) -> None:
    server, old, base = https
    server.add_route("/ok", "echo ok | kapow set /response/body")
    assert curl("--cacert", str(old.ca), base + "/ok").stdout == "ok\n"
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    new = make_pki(new_dir)
    live = tmp_path / "live"
    (live / "cert.pem").write_bytes(new.server_chain.read_bytes())
    (live / "key.pem").write_bytes(new.server_key.read_bytes())
    server.process.send_signal(signal.SIGHUP)

    def served_by(pki: PKI) -> bool:
        return curl("--cacert", str(pki.ca), base + "/ok").stdout == "ok\n"

    wait_for(lambda: served_by(new) and not served_by(old), 10, "the new certificate")
    # a broken certificate: the log says so and the one in force stays
    (live / "cert.pem").write_text("not a certificate\n")
    server.process.send_signal(signal.SIGHUP)
    server.wait_log(r"user HTTPS: keeping the certificate in force")
    for _ in range(4):
        assert served_by(new) and not served_by(old)


def test_sighup_reads_the_routes_auth_files_again(https: Any, tmp_path: Path) -> None:
    server, pki, base = https
    tokens = tmp_path / "tokens"
    tokens.write_text("first\n")
    server.add_route("/t", "echo in | kapow set /response/body", "--auth-bearer", str(tokens))

    def answer(token: str) -> str:
        return curl(
            "--cacert", str(pki.ca), "-H", f"Authorization: Bearer {token}", "-w", "%{http_code}", base + "/t"
        ).stdout

    assert answer("first") == "in\n200"
    tokens.write_text("second\n")
    assert answer("first") == "in\n200"  # read at creation, not per request
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: [answer("second"), answer("second"), answer("first")] == ["in\n200", "in\n200", "Unauthorized\n401"], 10, "the new tokens")  # fmt: skip
    tokens.unlink()
    server.process.send_signal(signal.SIGHUP)
    server.wait_log(r"keeping its auth files as they were")
    assert [answer("second") for _ in range(4)] == ["in\n200"] * 4


def test_http2_connections_keep_the_idle_limit_but_never_cut_a_quiet_handler(
    start_server: Any, tmp_path: Path
) -> None:
    import socket
    import ssl

    pki = make_pki(tmp_path)
    server = start_server(
        extra=("--certfile", str(pki.server_chain), "--keyfile", str(pki.server_key), "--idle-timeout", "1")
    )
    server.add_route("/quiet", "sleep 2.5; echo done | kapow set /response/body")
    server.add_route("/trickle", "for i in 1 2 3; do echo $i | kapow set /response/stream; sleep 0.8; done")
    base = server.user.replace("127.0.0.1", "localhost")
    for path, expected in (("/quiet", "done\n"), ("/trickle", "1\n2\n3\n")):
        result = curl("--http2", "--cacert", str(pki.ca), "-w", "%{http_version}", base + path)
        assert result.stdout == expected + "2", (path, result.stderr)
    # a connection that negotiated h2 and then sends nothing is told to go away (GOAWAY)
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.set_alpn_protocols(["h2"])
    host, port = server.user.removeprefix("https://").rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        received, kinds = b"", []
        while 7 not in kinds:
            chunk = tls.recv(65536)
            assert chunk, f"closed without GOAWAY after frames {kinds}"
            received += chunk
            while len(received) >= 9 and len(received) >= 9 + int.from_bytes(received[:3], "big"):
                kinds.append(received[3])
                received = received[9 + int.from_bytes(received[:3], "big") :]
        server.wait_log(r"Timing out client")


def _h2_frames_until_closed(tls: Any, deadline: float) -> tuple[list[tuple[int, bytes]], bool]:
    """
    The (type, payload) of each frame the server sends until it ends TLS
    (close_notify, or the connection closed), and whether it did by ``deadline``.
    """
    import time

    received, closed = b"", False
    while not closed and time.monotonic() < deadline:
        tls.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = tls.recv(65536)
        except TimeoutError:
            break
        received += chunk
        closed = not chunk
    found = []
    while len(received) >= 9 and len(received) >= 9 + int.from_bytes(received[:3], "big"):
        length = int.from_bytes(received[:3], "big")
        found.append((received[3], received[9 : 9 + length]))
        received = received[9 + length :]
    return found, closed


def _tcp_closed_by(tls: Any, seconds: float) -> bool:
    """Whether the server closes the TCP connection under ``tls`` within ``seconds``, with no close_notify of ours."""
    import socket

    with socket.socket(fileno=os.dup(tls.fileno())) as plain:
        plain.settimeout(seconds)
        try:
            return plain.recv(65536) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\x80", 9),  # HEADERS with HPACK index 0: COMPRESSION_ERROR
        (b"\x00\x00\x01\x04\x01\x00\x00\x00\x00\x00", 6),  # SETTINGS ACK with a payload: FRAME_SIZE_ERROR
        (b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + bytes(8), None),  # the client's GOAWAY: no answer
    ],
    ids=["hpack", "settings-ack", "goaway"],
)
def test_a_connection_the_protocol_ends_closes_at_once_and_alone(
    https: Any, tmp_path: Path, bad: bytes, code: int | None
) -> None:
    import socket
    import ssl
    import time

    server, pki, base = https
    gate = tmp_path / "gate"
    server.add_route(
        "/stream",
        "echo first | kapow set /response/stream; "
        f"n=0; while [ ! -e {gate} ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done; "
        "echo second | kapow set /response/stream",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CURL_CA_BUNDLE", "SSL_CERT_FILE")}
    other = subprocess.Popen(
        ["curl", "-sS", "-N", "--http2", "--cacert", str(pki.ca), base + "/stream"],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert other.stdout is not None
        assert other.stdout.readline() == b"first\n"  # another client's stream, open
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.set_alpn_protocols(["h2"])
        host, port = server.user.removeprefix("https://").rsplit(":", 1)
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.selected_alpn_protocol() == "h2"
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            time.sleep(0.2)
            tls.sendall(bad)
            # ended at once: not after the idle timeout (60 s)
            found, closed = _h2_frames_until_closed(tls, time.monotonic() + 5)
            assert closed, f"still open 5 s later, after frames {[kind for kind, _ in found]}"
            # and the TCP connection too, though this client never answers the close_notify
            assert _tcp_closed_by(tls, 5)
        goaways = [int.from_bytes(payload[4:8], "big") for kind, payload in found if kind == 7]
        assert goaways == ([] if code is None else [code])
        gate.touch()
        assert other.stdout.readline() == b"second\n"  # the other stream never noticed
        assert other.wait(10) == 0
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
