"""
A refusal says why (SPEC section 1): the real ``kapow route add`` prints
``kapow: Invalid Route: DETAIL`` naming the cause, and the server log stays
quiet about what was refused, with one line per route change. (The data API's
details reach curl in test_lifecycle.)
"""

from __future__ import annotations

import json

from tests.support.kapowserver import KapowServer


def test_route_add_prints_the_reason_and_the_detail(server: KapowServer) -> None:
    # each refusal's detail is the unit tests' (test_routes, test_control_api): here, how the CLI shows one
    refused = server.kapow("route", "add", "-X", "GE T", "/x", "-c", "true")
    detail = "method 'GE T' is not an HTTP token (no spaces or separators)"
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
