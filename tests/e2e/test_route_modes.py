"""
The route fields of websocket and event-stream routes (SPEC section 11), as
``kapow route add`` sends them to a real server and ``kapow route list``
shows them, and the routes the server refuses.
"""

from __future__ import annotations

import json

import pytest

from tests.support.kapowserver import KapowServer


def test_a_websocket_route_keeps_its_fields(server: KapowServer) -> None:
    added = server.kapow(
        "route", "add", "--mode", "websocket", "--origin", "https://a.example", "--messages", "binary",
        "--max-message", "2K", "--ping", "5", "/ws", "-c", "cat",
    )  # fmt: skip
    assert (added.returncode, added.stderr) == (0, ""), added
    route = json.loads(added.stdout)
    expected = {
        "method": "GET",
        "url_pattern": "/ws",
        "entrypoint": "/bin/sh -c",
        "command": "cat",
        "index": 0,
        "mode": "websocket",
        "origins": ["https://a.example"],
        "messages": "binary",
        "max_message": 2048,
        "ping": 5,
    }
    assert {key: value for key, value in route.items() if key != "id"} == expected
    listed = server.kapow("route", "list")
    assert listed.returncode == 0, listed
    assert json.loads(listed.stdout) == [route]
    assert "heartbeat" not in route


@pytest.mark.parametrize(
    ("flags", "body", "why"),
    [
        (
            ("--mode", "websocket", "--stdin", "body"),
            {"mode": "websocket", "stdin": "body"},
            "mode websocket takes no stdin",
        ),
        (
            ("-X", "POST", "--mode", "events"),
            {"method": "POST", "mode": "events"},
            "mode events needs method GET, not POST",
        ),
        (
            ("--origin", "not-a-url", "--mode", "websocket"),
            {"mode": "websocket", "origins": ["not-a-url"]},
            "origin 'not-a-url' is not '*' or an http, https, ws or wss URL of a host"
            " (scheme://host[:port], no path, query or fragment)",
        ),
        (
            ("--max-message", "0", "--mode", "websocket"),
            {"mode": "websocket", "max_message": 0},
            "max_message must be an integer >= 1 (bytes), not 0",
        ),
    ],
)
def test_a_route_the_server_refuses_is_its_reason_and_a_422(
    server: KapowServer, flags: tuple[str, ...], body: dict[str, object], why: str
) -> None:
    refused = server.kapow("route", "add", *flags, "/ws", "-c", "cat")
    assert (refused.returncode, refused.stdout, refused.stderr) == (1, "", f"kapow: Invalid Route: {why}\n")

    answer = server.curl_control(
        "-i", "-X", "POST", "--data-binary", "@-", server.control + "/routes",
        input=json.dumps({"method": "GET", "url_pattern": "/ws", "command": "cat", **body}).encode(),
    )  # fmt: skip
    head, _, refusal = answer.stdout.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0] == b"HTTP/1.1 422 Invalid Route", answer.stdout
    assert json.loads(refusal) == {"reason": "Invalid Route", "detail": why}
    assert json.loads(server.kapow("route", "list").stdout) == []
