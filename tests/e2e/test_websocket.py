"""
WebSocket routes (SPEC.md §11) on a real server, alone and with
``--workers 2``, over HTTP and HTTPS: real ``/bin/sh`` handlers, the
hand-rolled client of :mod:`tests.support.websocket` for every edge, and
Twisted's own WebSocket client for the ordinary round trip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.kapowserver import KapowServer, curl, free_port, group_members, read_int, wait_for
from tests.support.pki import make_pki
from tests.support.websocket import BINARY, PING, TEXT, WebSocketClient, frame_bytes

HERE = Path(__file__).resolve().parent


def ws_url(server: KapowServer, path: str) -> str:
    return server.user.replace("http://", "ws://").replace("https://", "wss://") + path


def connect(server: KapowServer, path: str, **headers: str | None) -> WebSocketClient:
    client = WebSocketClient(ws_url(server, path))
    status, found, body = client.handshake(headers)
    assert status == 101, (status, found, body)
    return client


@pytest.fixture(params=[(), ("--workers", "2")], ids=["one", "workers"])
def either(request: Any, start_server: Any) -> KapowServer:
    """A server alone, or with two workers."""
    return start_server(extra=request.param)


def test_lines_go_both_ways_and_a_clean_exit_closes_with_1000(either: KapowServer) -> None:
    either.add_route(
        "/upper",
        'while read -r l; do echo "$l" | tr a-z A-Z; [ "$l" = bye ] && exit 0; done',
        "--mode",
        "websocket",
    )
    client = connect(either, "/upper")
    client.send_text("hello")
    assert client.recv().text == "HELLO"
    client.send_binary(b"binary becomes a line too")
    assert client.recv().text == "BINARY BECOMES A LINE TOO"
    client.send_text("héllo wörld")
    frame = client.recv()
    assert (frame.opcode, frame.text) == (TEXT, "HéLLO WöRLD")
    client.send_text("bye")
    rest, close = client.messages_until_close()
    assert [f.text for f in rest] == ["BYE"]
    assert close.close_code == 1000


def test_a_failing_process_sends_its_output_then_1011(server: KapowServer) -> None:
    server.add_route("/fail", "echo one; printf 'two\\r\\nthree'; exit 3", "--mode", "websocket")
    client = connect(server, "/fail")
    rest, close = client.messages_until_close()
    assert [f.text for f in rest] == ["one", "two", "three"]
    assert close.close_code == 1011


def test_output_that_is_not_utf8_is_a_binary_message(server: KapowServer) -> None:
    server.add_route("/bytes", "printf 'ok\\n\\377\\376\\n'", "--mode", "websocket")
    client = connect(server, "/bytes")
    rest, close = client.messages_until_close()
    assert [(f.opcode, f.payload) for f in rest] == [(TEXT, b"ok"), (BINARY, b"\xff\xfe")]
    assert close.close_code == 1000


def test_binary_messages_go_as_they_are(server: KapowServer) -> None:
    server.add_route(
        "/bin",
        "od -An -tx1 -N4 -v; printf '\\000\\001\\n\\002'",
        "--mode",
        "websocket",
        "--messages",
        "binary",
    )
    client = connect(server, "/bin")
    client.send_binary(b"\x00\n\xff")
    client.send_binary(b"A")
    rest, close = client.messages_until_close()
    data = b"".join(f.payload for f in rest)
    assert all(f.opcode == BINARY for f in rest)
    assert data == b" 00 0a ff 41\n\x00\x01\n\x02"
    assert close.close_code == 1000


@pytest.mark.parametrize(
    ("headers", "method"),
    [
        ({"Upgrade": None}, "GET"),
        ({"Connection": "keep-alive"}, "GET"),
        ({"Sec-WebSocket-Version": "8"}, "GET"),
        ({"Sec-WebSocket-Key": "too-short"}, "GET"),
        ({"Sec-WebSocket-Key": None}, "GET"),
    ],
    ids=["no-upgrade", "no-connection-upgrade", "version-8", "bad-key", "no-key"],
)
def test_a_request_without_a_valid_upgrade_gets_426_and_no_process(
    server: KapowServer, tmp_path: Path, headers: dict[str, str | None], method: str
) -> None:
    ran = tmp_path / "ran"
    server.add_route("/ws", f"touch {ran}; cat", "--mode", "websocket")
    client = WebSocketClient(ws_url(server, "/ws"))
    status, found, _body = client.handshake(headers, method)
    assert (status, found.get("upgrade"), found.get("sec-websocket-version")) == (426, "websocket", "13")
    plain = curl("-s", "-D", "-", server.user + "/ws")
    assert plain.stdout.startswith("HTTP/1.1 426"), plain.stdout
    time.sleep(0.2)
    assert not ran.exists()


def test_origins_the_route_does_not_allow_get_403(server: KapowServer) -> None:
    server.add_route("/own", "cat", "--mode", "websocket")
    server.add_route("/listed", "cat", "--mode", "websocket", "--origin", "https://app.example")
    server.add_route("/any", "cat", "--mode", "websocket", "--origin", "*")
    host = server.user.removeprefix("http://")

    def status(path: str, origin: str | None) -> int:
        client = WebSocketClient(ws_url(server, path))
        try:
            return client.handshake({"Origin": origin})[0]
        finally:
            client.shutdown()

    assert status("/own", None) == 101
    assert status("/own", f"http://{host}") == 101
    assert status("/own", f"HTTP://{host.upper()}") == 101
    assert status("/own", f"https://{host}") == 403
    assert status("/own", "http://evil.example") == 403
    assert status("/listed", "https://app.example") == 101
    assert status("/listed", "https://APP.example:443") == 101
    assert status("/listed", "http://app.example") == 403
    assert status("/any", "null") == 101


def test_allow_lists_and_auth_come_before_the_upgrade(server: KapowServer, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    server.add_route("/far", f"touch {ran}", "--mode", "websocket", "--allow", "10.0.0.0/8")
    server.add_route("/auth", "echo in", "--mode", "websocket", "--auth-bearer", str(tokens))
    client = WebSocketClient(ws_url(server, "/far"))
    assert client.handshake()[0] == 403
    client = WebSocketClient(ws_url(server, "/auth"))
    status, found, _ = client.handshake()
    assert (status, found.get("www-authenticate")) == (401, "Bearer")
    client = connect(server, "/auth", Authorization="Bearer s3cret")
    assert client.recv().text == "in"
    assert not ran.exists()


def test_an_oversized_message_closes_only_its_connection_with_1009(server: KapowServer) -> None:
    server.add_route("/ws", "cat", "--mode", "websocket", "--max-message", "1K")
    other = connect(server, "/ws")
    client = connect(server, "/ws")
    client.send_text("x" * 1000)
    assert client.recv().text == "x" * 1000
    client.send(TEXT, b"y" * 600, fin=False)
    client.send(0x0, b"y" * 600)  # a continuation: 1200 bytes in all
    rest, close = client.messages_until_close()
    assert (rest, close.close_code) == ([], 1009)
    other.send_text("still here")
    assert other.recv().text == "still here"


def test_a_frame_that_breaks_the_protocol_closes_with_1002(server: KapowServer) -> None:
    server.add_route("/ws", "cat", "--mode", "websocket")
    other = connect(server, "/ws")
    client = connect(server, "/ws")
    client.sock.sendall(frame_bytes(TEXT, b"unmasked", mask=False))
    _rest, close = client.messages_until_close()
    assert close.close_code == 1002
    other.send_text("fine")
    assert other.recv().text == "fine"


def test_a_client_that_never_answers_pings_is_closed(server: KapowServer, tmp_path: Path) -> None:
    server.add_route("/ws", f"echo $$ > {tmp_path}/pid; cat", "--mode", "websocket", "--ping", "0.5")
    rude = connect(server, "/ws")
    frame = rude.recv(answer_pings=False)
    assert frame.opcode == PING
    rude.sock.settimeout(5)
    assert rude.closed_by_peer()
    polite = connect(server, "/ws")
    for n in range(6):  # pings come every half second, and are answered
        polite.send_text(f"alive {n}")
        assert polite.recv().text == f"alive {n}"
        time.sleep(0.3)


def test_the_client_leaving_ends_the_process_group(server: KapowServer, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    server.add_route("/ws", f"sh -c 'echo $$ > {pid_file}; exec sleep 60' & cat", "--mode", "websocket")
    client = connect(server, "/ws")
    listed = wait_for(lambda: json.loads(server.kapow("handler", "list").stdout), what="a handler")
    assert [h["state"] for h in listed] == ["websocket"]
    pgid = listed[0]["pid"]
    child = read_int(pid_file)
    assert os.getpgid(child) == pgid
    client.close()
    client.messages_until_close()
    wait_for(lambda: not group_members(pgid), what="the group to end")
    wait_for(lambda: json.loads(server.kapow("handler", "list").stdout) == [], what="no handler")
    line = server.wait_log(r'"GET /ws HTTP/1.1" 101 \d+')
    assert line


def test_the_data_api_reads_the_upgrade_and_refuses_response_writes(server: KapowServer) -> None:
    server.add_route(
        "/ws",
        "echo $(kapow get /request/headers/X-Name); kapow set /response/status 201 2>&1; echo \"exit $?\"",
        "--mode", "websocket",
    )  # fmt: skip
    client = connect(server, "/ws", **{"X-Name": "ada"})
    rest, _close = client.messages_until_close()
    texts = [f.text for f in rest]
    assert texts[0] == "ada"
    assert "Response Already Started" in " ".join(texts)
    assert texts[-1] == "exit 1"


def test_a_process_that_does_not_read_stops_the_server_reading(server: KapowServer, tmp_path: Path) -> None:
    server.add_route("/ws", "sleep 60", "--mode", "websocket", "--messages", "binary")
    client = connect(server, "/ws")
    client.sock.settimeout(3)
    chunk = frame_bytes(BINARY, b"z" * (512 * 1024))
    sent = 0
    with pytest.raises(TimeoutError):
        for _ in range(128):  # 64 MiB: far more than the server and the kernel hold
            client.sock.sendall(chunk)
            sent += 1
    assert sent < 64, sent


def test_a_client_that_does_not_read_pauses_the_process(server: KapowServer, tmp_path: Path) -> None:
    count = tmp_path / "count"
    server.add_route(
        "/ws",
        f"i=0; while :; do head -c 100000 /dev/zero | tr '\\0' x; echo; i=$((i+1)); echo $i > {count}.new; mv {count}.new {count}; done",
        "--mode", "websocket",
    )  # fmt: skip
    client = connect(server, "/ws")
    assert client.recv().payload == b"x" * 100000
    counts = [read_int(count)]
    while len(counts) < 4 or len(set(counts[-3:])) > 1:  # until it stands still for a second
        assert len(counts) < 60, counts
        time.sleep(0.5)
        counts.append(read_int(count))
    assert counts[-1] < 400, counts  # under 40 MB: the kernel's buffers, not the server's
    for _ in range(50):
        client.recv()  # reading again lets it go on
    wait_for(lambda: read_int(count) > counts[-1], what="the process to go on")


def test_a_route_timeout_bounds_the_connection(server: KapowServer) -> None:
    server.add_route("/ws", "cat", "--mode", "websocket", "--timeout", "1")
    client = connect(server, "/ws")
    started = time.monotonic()
    client.send_text("a")
    rest, close = client.messages_until_close()
    assert [f.text for f in rest] == ["a"]
    assert close.close_code == 1011
    assert time.monotonic() - started < 10


def test_a_queued_upgrade_waits_for_a_free_slot(server: KapowServer) -> None:
    server.add_route(
        "/ws", "echo $KAPOW_HANDLER_ID; cat", "--mode", "websocket", "--max-concurrency", "1", "--queue", "1"
    )
    first = connect(server, "/ws")
    first.recv()
    second = WebSocketClient(ws_url(server, "/ws"))
    second.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        second.handshake()
    third = WebSocketClient(ws_url(server, "/ws"))
    assert third.handshake()[0] == 503
    first.close()
    first.messages_until_close()
    second.sock.settimeout(10)
    while b"\r\n\r\n" not in second.buffer:
        second._fill()
    assert second.buffer.startswith(b"HTTP/1.1 101")


def test_a_graceful_stop_closes_connections_with_1001(either: KapowServer) -> None:
    server = either
    server.add_route("/ws", "cat", "--mode", "websocket")
    client = connect(server, "/ws")
    client.send_text("x")
    assert client.recv().text == "x"
    server.process.send_signal(signal.SIGTERM)
    _rest, close = client.messages_until_close()
    assert close.close_code == 1001
    assert server.process.wait(15) == 0


def test_metrics_count_connections_and_messages(start_server: Any) -> None:
    port = free_port()
    server = start_server(extra=("--metrics-bind", f"127.0.0.1:{port}"))
    route = server.add_route("/ws", "cat", "--mode", "websocket")
    client = connect(server, "/ws")
    client.send_text("one")
    client.recv()
    client.send_text("two")
    client.recv()

    def metric(name: str) -> str:
        text = curl(f"http://127.0.0.1:{port}/metrics").stdout
        return "\n".join(line for line in text.splitlines() if line.startswith(name))

    labels = f'pattern="/ws",route_id="{route["id"]}"'
    assert f"kapow_websocket_connections{{{labels}}} 1.0" in metric("kapow_websocket_connections")
    messages = metric("kapow_websocket_messages_total")
    assert f'kapow_websocket_messages_total{{direction="in",{labels}}} 2.0' in messages
    assert f'kapow_websocket_messages_total{{direction="out",{labels}}} 2.0' in messages
    client.close()
    client.messages_until_close()
    wait_for(
        lambda: f"kapow_websocket_connections{{{labels}}} 0.0" in metric("kapow_websocket_connections"),
        what="0 open",
    )


@pytest.fixture(params=[(), ("--workers", "2")], ids=["one", "workers"])
def https(request: Any, start_server: Any, tmp_path: Path) -> tuple[KapowServer, str]:
    pki = make_pki(tmp_path)
    server = start_server(
        extra=("--certfile", str(pki.server_chain), "--keyfile", str(pki.server_key), *request.param)
    )
    return server, str(pki.ca)


def test_wss_works_and_http2_gets_426(https: tuple[KapowServer, str]) -> None:
    server, ca = https
    server.add_route("/ws", "cat", "--mode", "websocket")
    client = WebSocketClient(ws_url(server, "/ws").replace("127.0.0.1", "localhost"), cafile=ca)
    status, _found, _ = client.handshake(
        {"Host": server.user.removeprefix("https://").replace("127.0.0.1", "localhost")}
    )
    assert status == 101
    client.send_text("secure")
    assert client.recv().text == "secure"
    client.close()
    assert client.messages_until_close()[1].close_code == 1000
    h2 = curl("--http2", "--cacert", ca, "-s", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
              server.user.replace("127.0.0.1", "localhost") + "/ws")  # fmt: skip
    assert h2.stdout == "2 426", h2


def test_twisteds_own_client_talks_to_a_route(server: KapowServer) -> None:
    server.add_route("/upper", 'while read -r l; do echo "$l" | tr a-z A-Z; done', "--mode", "websocket")
    result = subprocess.run(
        [sys.executable, str(HERE.parent / "support" / "twisted_websocket.py"), ws_url(server, "/upper"), "one", "two"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ONE", "TWO"]
