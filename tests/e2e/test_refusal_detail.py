"""
A refusal says why (SPEC section 1): the real ``kapow route add`` prints
``kapow: Invalid Route: DETAIL`` naming the cause, the data API's JSON error
carries its ``detail`` to curl, and the server log stays quiet about what
was refused, with one line per route change.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from tests.support.kapowserver import KapowServer, curl


@pytest.mark.parametrize(
    ("args", "detail"),
    [
        (("/bad/{",), "unbalanced braces in url_pattern '/bad/{'"),
        (("nope",), "url_pattern 'nope' does not start with '/'"),
        (("/x/{a}/{a}",), "placeholder name 'a' appears twice in url_pattern '/x/{a}/{a}'"),
        (
            ("/x/{id:[0-9}",),
            "regex '[0-9' of placeholder 'id' does not compile: unterminated character set at position 0",
        ),
        (("-X", "GE T", "/x"), "method 'GE T' is not an HTTP token (no spaces or separators)"),
    ],
)
def test_route_add_prints_the_reason_and_the_detail(
    server: KapowServer, args: tuple[str, ...], detail: str
) -> None:
    refused = server.kapow("route", "add", *args, "-c", "true")
    assert (refused.returncode, refused.stdout, refused.stderr) == (
        1,
        "",
        f"kapow: Invalid Route: {detail}\n",
    )
    assert json.loads(server.kapow("route", "list").stdout) == []


def test_a_refusal_is_not_logged_and_a_change_is_one_line(server: KapowServer) -> None:
    refused = server.kapow("route", "add", "/bad/{", "-c", "true")
    assert refused.returncode == 1, refused
    added = server.add_route("/ok", "true")
    removed = server.kapow("route", "remove", added["id"])
    assert removed.returncode == 0, removed
    server.wait_log(r"route removed: " + added["id"])
    # the access log of the refused call is there, and nothing else says why it was refused
    assert any('"POST /routes HTTP/1.1" 422' in line for line in server.lines), server.output()
    assert not any("unbalanced" in line or "refused route" in line for line in server.lines), server.output()
    changes = [line.split("] ", 1)[1] for line in server.lines if "] route " in line]
    assert changes == ["route added: " + json.dumps(added), "route removed: " + added["id"]]


def test_curl_gets_the_detail_of_a_data_api_refusal(server: KapowServer, tmp_path: Path) -> None:
    answer = tmp_path / "answer"
    server.add_route(
        "/status",
        'curl -sS -i -X PUT --data-binary abc "$KAPOW_DATA_URL/handlers/$KAPOW_HANDLER_ID/response/status"'
        f" > {shlex.quote(str(answer))}",
    )
    done = curl(server.user + "/status")
    assert done.returncode == 0, done
    text = answer.read_bytes().decode()  # complete: the user's answer came when the handler exited
    head, _, body = text.partition("\r\n\r\n")
    assert head.split("\r\n")[0] == "HTTP/1.1 422 Non Integer Value", text
    assert json.loads(body) == {"reason": "Non Integer Value", "detail": "status 'abc' is not an integer"}
