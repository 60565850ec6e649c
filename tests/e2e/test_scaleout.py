"""
Scale-out behind nginx: two real kapow instances started from the same init
program, and a real nginx running contrib/nginx/kapow.conf in front of them.

nginx runs as this test's own child process (``daemon off``, its own pid file,
logs and temporary directories), listening on a loopback port the test picks.
Its prefix directory is made with ``mkdtemp`` directly under the system
temporary directory and opened to traversal (0711): when the test runs as
root, nginx's workers switch to ``nobody``, and they must be able to spool
request bodies into ``client_body_temp_path`` (nginx creates those directories
and hands them to the worker user). pytest's own ``tmp_path`` is unusable for
that: its parents are private to the user running the tests.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.support.kapowserver import KapowServer, curl, write_program
from tests.support.nginx import CONTRIB_CONF, NGINX, Nginx, hostport
from tests.support.websocket import TEXT, WebSocketClient

INIT_PROGRAM = r"""#!/bin/sh
set -e
kapow route add /instance -c 'printf "%s\n" "$KAPOW_INSTANCE" | kapow set /response/body'

kapow route add /client - <<'EOF_COMMAND'
get() { kapow get "$1" 2>/dev/null || printf '(absent)'; }
{
  printf 'version=%s\n' "$(get /request/version)"
  printf 'connection=%s\n' "$(get /request/headers/Connection)"
  printf 'host=%s\n' "$(get /request/host)"
  printf 'x-forwarded-for=%s\n' "$(get /request/headers/X-Forwarded-For)"
  printf 'x-forwarded-proto=%s\n' "$(get /request/headers/X-Forwarded-Proto)"
} | kapow set /response/body
EOF_COMMAND

kapow route add /stream - <<'EOF_COMMAND'
printf 'first from %s\n' "$KAPOW_INSTANCE" | kapow set /response/stream
n=0
while [ ! -e "$GATE" ] && [ "$n" -lt 200 ]; do sleep 0.05; n=$((n + 1)); done
printf 'second\n' | kapow set /response/stream
EOF_COMMAND

kapow route add -X POST /upload - <<'EOF_COMMAND'
sum=$(kapow get /request/body | sha256sum)
printf '%s %s\n' "$KAPOW_INSTANCE" "${sum%% *}" | kapow set /response/body
EOF_COMMAND

kapow route add --mode websocket /cat -c 'exec cat'
kapow route add --mode events /events -c 'echo one; sleep 3; echo two'
"""


@pytest.fixture
def cluster(start_server: Any, tmp_path: Path) -> Iterator[tuple[list[KapowServer], Nginx, Path]]:
    """Two instances (markers ``a`` and ``b``) and nginx in front of them."""
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    init = write_program(tmp_path / "app.pow", INIT_PROGRAM)
    gate = tmp_path / "gate"
    instances = []
    for marker in ("a", "b"):
        server = start_server(init, env={**os.environ, "KAPOW_INSTANCE": marker, "GATE": str(gate)})
        instances.append(server)
    for server in instances:
        server.wait_log(r"app\.pow exited with status 0")
    proxy = Nginx([hostport(s.user) for s in instances])
    try:
        yield instances, proxy, gate
    finally:
        proxy.stop()


def test_contrib_conf_keeps_what_scale_out_needs() -> None:
    directives = {
        " ".join(line.split("#")[0].split())
        for line in CONTRIB_CONF.read_text().splitlines()
        if line.split("#")[0].strip()
    }
    for needed in (
        "proxy_pass http://kapow;",
        "proxy_http_version 1.1;",
        "map $http_upgrade $connection_upgrade {",
        "default upgrade;",
        "'' \"\";",  # no Connection header but for an upgrade: keep-alive stays
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_set_header Host $http_host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_buffering off;",
    ):
        assert needed in directives, needed
    assert any(d.startswith("keepalive ") for d in directives)
    # above the default --ping (30 s) and --heartbeat (15 s)
    timeouts = [d for d in directives if d.startswith("proxy_read_timeout ")]
    assert timeouts == ["proxy_read_timeout 300s;"]


def test_requests_are_spread_over_both_instances(cluster: Any) -> None:
    instances, proxy, _gate = cluster
    for server, marker in zip(instances, "ab", strict=False):
        assert curl(server.user + "/instance").stdout == marker + "\n"
    seen = []
    for _ in range(20):
        result = curl("-w", "%{http_code}", proxy.url + "/instance")
        assert result.returncode == 0, result.stderr
        seen.append(result.stdout)
    assert set(seen) == {"a\n200", "b\n200"}
    assert seen.count("a\n200") >= 5 and seen.count("b\n200") >= 5
    for server in instances:
        server.wait_log(r'"GET /instance HTTP/1\.1" 200 2 ')


def test_handlers_see_the_forwarded_client(cluster: Any) -> None:
    _instances, proxy, _gate = cluster
    result = curl("-H", "X-Forwarded-For: 203.0.113.7", proxy.url + "/client")
    assert result.stdout == (
        "version=HTTP/1.1\n"
        "connection=(absent)\n"
        f"host=127.0.0.1:{proxy.port}\n"
        "x-forwarded-for=203.0.113.7, 127.0.0.1\n"
        "x-forwarded-proto=http\n"
    )


def _lines(stream: IO[bytes]) -> queue.Queue[bytes]:
    lines: queue.Queue[bytes] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(b"")

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_a_stream_passes_through_as_it_is_written(cluster: Any) -> None:
    _instances, proxy, gate = cluster
    request = subprocess.Popen(
        ["curl", "-sS", "-N", "--max-time", "20", proxy.url + "/stream"],
        stdout=subprocess.PIPE,
    )
    try:
        assert request.stdout is not None
        lines = _lines(request.stdout)
        # the handler writes its second line only after the first one got through nginx
        first = lines.get(timeout=5)
        assert re.fullmatch(rb"first from [ab]\n", first), first
        gate.touch()
        assert lines.get(timeout=5) == b"second\n"
        assert lines.get(timeout=5) == b""
        assert request.wait(5) == 0
    finally:
        if request.poll() is None:
            request.kill()
            request.wait()


def test_uploads_larger_than_nginx_buffers(cluster: Any, tmp_path: Path) -> None:
    _instances, proxy, _gate = cluster
    data = os.urandom(300_000)
    payload = tmp_path / "payload"
    payload.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    answers = set()
    for _ in range(4):
        result = curl("--data-binary", f"@{payload}", "-w", "%{http_code}", proxy.url + "/upload")
        marker, _, rest = result.stdout.partition(" ")
        assert rest == expected + "\n200", proxy.errors()
        answers.add(marker)
    assert answers == {"a", "b"}
    assert "buffered to a temporary file" in proxy.errors()


def test_a_websocket_upgrade_goes_through(cluster: Any) -> None:
    _instances, proxy, _gate = cluster
    url = proxy.url.replace("http://", "ws://") + "/cat"
    client = WebSocketClient(url)
    try:
        # Host reaches the instance as the client sent it: its own origin is nginx's
        status, headers, _ = client.handshake({"Origin": proxy.url})
        assert status == 101, proxy.errors()
        assert headers["upgrade"].lower() == "websocket"
        client.send_text("through nginx")
        frame = client.recv()
        assert (frame.opcode, frame.text) == (TEXT, "through nginx")
        client.send_text("and back")
        assert client.recv().text == "and back"
        client.close()
        frames, closing = client.messages_until_close()
        assert (frames, closing.close_code) == ([], 1000)
    finally:
        client.shutdown()
    # the upgrade's checks answer through nginx as well
    foreign = WebSocketClient(url)
    try:
        assert foreign.handshake({"Origin": "http://elsewhere.example"})[0] == 403
    finally:
        foreign.shutdown()
    plain = curl("-o", "/dev/null", "-w", "%{http_code}", proxy.url + "/cat")
    assert plain.stdout == "426"


def test_an_event_stream_goes_through_unbuffered(cluster: Any) -> None:
    _instances, proxy, _gate = cluster
    started = time.monotonic()
    request = subprocess.Popen(
        ["curl", "-sS", "-N", "-i", "--max-time", "20", proxy.url + "/events"],
        stdout=subprocess.PIPE,
    )
    try:
        assert request.stdout is not None
        lines = _lines(request.stdout)
        head = []
        while (line := lines.get(timeout=5)) not in (b"\r\n", b""):
            head.append(line.decode().strip().lower())
        assert head[0].startswith("http/1.1 200"), head
        assert "content-type: text/event-stream" in head
        # the handler sleeps 3 s between its two lines: the first one is not held back
        assert lines.get(timeout=max(0.1, started + 1.5 - time.monotonic())) == b"data: one\n"
        first = time.monotonic()
        assert first - started < 1.5
        assert lines.get(timeout=1) == b"\n"
        assert lines.get(timeout=5) == b"data: two\n"
        assert time.monotonic() - first > 2.5
        assert lines.get(timeout=5) == b"\n"
        assert lines.get(timeout=5) == b""
        assert request.wait(5) == 0
    finally:
        if request.poll() is None:
            request.kill()
            request.wait()
