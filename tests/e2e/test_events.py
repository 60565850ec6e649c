"""
Event-stream routes (SPEC.md §11) on a real server, alone and with
``--workers 2``, read with curl over HTTP/1.1 and HTTP/2.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.kapowserver import KapowServer, curl, group_members, read_int, wait_for
from tests.support.pki import make_pki


@pytest.fixture(params=[(), ("--workers", "2")], ids=["one", "workers"])
def either(request: Any, start_server: Any) -> KapowServer:
    return start_server(extra=request.param)


def test_each_line_is_an_event_and_fields_pass_through(either: KapowServer) -> None:
    either.add_route(
        "/tick",
        "echo 'retry: 5000'; echo 'event: tick'; echo 'id: 1'; echo one; printf 'two\\r\\n\\nlast'",
        "--mode", "events",
    )  # fmt: skip
    result = curl("-sN", "-D", "-", either.user + "/tick")
    head, _, body = result.stdout.partition("\n\n")
    assert head.startswith("HTTP/1.1 200")
    headers = {line.split(": ", 1)[0].lower(): line.split(": ", 1)[1] for line in head.splitlines()[1:]}
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no"
    assert body == "retry: 5000\nevent: tick\nid: 1\ndata: one\n\ndata: two\n\ndata: \n\ndata: last\n\n"


def test_every_line_is_sent_as_soon_as_it_is_complete(server: KapowServer) -> None:
    server.add_route("/slow", "echo first; sleep 3; echo second", "--mode", "events")
    started = time.monotonic()
    reader = subprocess.Popen(["curl", "-sN", server.user + "/slow"], stdout=subprocess.PIPE)
    assert reader.stdout is not None
    assert reader.stdout.readline() == b"data: first\n"
    assert time.monotonic() - started < 2.5
    assert reader.stdout.read() == b"\ndata: second\n\n"
    reader.wait(5)


def test_heartbeats_while_nothing_else_is_sent(server: KapowServer) -> None:
    server.add_route("/quiet", "echo hi; sleep 1.3; echo bye", "--mode", "events", "--heartbeat", "0.5")
    body = curl("-sN", server.user + "/quiet").stdout
    assert body.startswith("data: hi\n\n: keep-alive\n: keep-alive\n"), body
    assert body.endswith("data: bye\n\n")
    server.add_route("/never", "sleep 0.8; echo done", "--mode", "events", "--heartbeat", "0")
    assert curl("-sN", server.user + "/never").stdout == "data: done\n\n"


def test_the_client_leaving_ends_the_process_group(server: KapowServer, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    server.add_route(
        "/forever", f"echo $$ > {pid_file}; while :; do echo x; sleep 0.1; done", "--mode", "events"
    )
    reader = subprocess.Popen(["curl", "-sN", server.user + "/forever"], stdout=subprocess.PIPE)
    assert reader.stdout is not None
    assert reader.stdout.readline() == b"data: x\n"
    pid = read_int(pid_file)
    listed = json.loads(server.kapow("handler", "list").stdout)
    assert [(h["pid"], h["state"]) for h in listed] == [(pid, "streaming")]
    reader.kill()
    reader.wait()
    wait_for(lambda: not group_members(pid), what="the group to end")
    server.wait_log(r"client disconnected: ending its process group")


def test_the_request_is_readable_and_response_writes_are_refused(server: KapowServer) -> None:
    server.add_route(
        "/e",
        "echo $(kapow get /request/headers/Last-Event-ID); kapow set /response/body x 2>&1; echo \"exit $?\"",
        "--mode", "events",
    )  # fmt: skip
    body = curl("-sN", "-H", "Last-Event-ID: 41", server.user + "/e").stdout
    assert body == "data: 41\n\ndata: kapow: Response Already Started\n\ndata: exit 1\n\n"


def test_an_event_stream_over_http2(start_server: Any, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    server = start_server(extra=("--certfile", str(pki.server_chain), "--keyfile", str(pki.server_key)))
    server.add_route("/h2", "echo one; sleep 0.2; echo two", "--mode", "events")
    url = server.user.replace("127.0.0.1", "localhost") + "/h2"
    result = curl("--http2", "--cacert", str(pki.ca), "-sN", "-w", "%{http_version}", url)
    assert result.stdout == "data: one\n\ndata: two\n\n2", result.stderr


def test_a_route_timeout_cuts_the_stream(server: KapowServer) -> None:
    server.add_route("/long", "echo start; sleep 30", "--mode", "events", "--timeout", "1")
    started = time.monotonic()
    result = curl("-sN", server.user + "/long")
    assert result.stdout == "data: start\n\n"
    assert time.monotonic() - started < 10
