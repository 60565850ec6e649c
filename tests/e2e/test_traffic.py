"""
Traffic policy (SPEC.md §13) on a real server, alone and with
``--workers 2``: rate limits decided before any process starts, exact
across workers, and CORS answered by the server itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.kapowserver import KapowServer, curl, free_port, wait_for


@pytest.fixture(params=[(), ("--workers", "2")], ids=["one", "workers"])
def either(request: Any, start_server: Any) -> KapowServer:
    return start_server(extra=request.param)


def codes(server: KapowServer, path: str, n: int, *args: str) -> list[str]:
    return [
        curl("-s", "-o", "/dev/null", "-w", "%{http_code}", *args, server.user + path).stdout
        for _ in range(n)
    ]


def test_a_rate_refuses_with_429_and_no_process(either: KapowServer, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    either.add_route("/r", f"echo x >> {ran}", "--rate", "3/h")
    assert codes(either, "/r", 5) == ["200", "200", "200", "429", "429"]  # exact across workers
    assert len(ran.read_text().splitlines()) == 3
    head = curl("-s", "-D", "-", "-o", "/dev/null", either.user + "/r").stdout
    assert head.startswith("HTTP/1.1 429 Too Many Requests")
    retry = [
        line.split(":", 1)[1].strip() for line in head.splitlines() if line.lower().startswith("retry-after")
    ]
    assert retry and 1000 <= int(retry[0]) <= 1200  # a token every 20 minutes


def test_a_burst_and_a_key_for_the_whole_route(server: KapowServer) -> None:
    server.add_route("/b", "true", "--rate", "1/h", "--burst", "2", "--rate-key", "route")
    assert codes(server, "/b", 3) == ["200", "200", "429"]


def test_checks_come_in_order_allow_rate_auth(server: KapowServer, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("t\n")
    server.add_route("/far", "true", "--rate", "1/h", "--allow", "10.0.0.0/8")
    assert codes(server, "/far", 3) == [
        "403",
        "403",
        "403",
    ]  # the allow list first: the rate never counts them
    server.add_route("/tok", "true", "--rate", "2/h", "--auth-bearer", str(tokens))
    assert codes(server, "/tok", 3) == ["401", "401", "429"]  # the rate before auth


def test_refusals_are_counted(start_server: Any) -> None:
    port = free_port()
    server = start_server(extra=("--metrics-bind", f"127.0.0.1:{port}"))
    route = server.add_route("/m", "true", "--rate", "1/h")
    codes(server, "/m", 3)
    line = f'kapow_refused_total{{pattern="/m",route_id="{route["id"]}",why="rate"}} 2.0'
    wait_for(lambda: line in curl(f"http://127.0.0.1:{port}/metrics").stdout, what="the refusals counted")


@pytest.mark.parametrize("args", [("--rate", "0/s"), ("--rate", "banana")])
def test_bad_rates_are_refused(server: KapowServer, args: tuple[str, ...]) -> None:
    result = server.kapow("route", "add", *args, "/x", "-c", "true")
    assert (result.returncode, result.stdout) == (1, ""), result
    assert result.stderr.startswith(
        "kapow route add: argument --rate: invalid rate "
    ) and result.stderr.endswith(" (see kapow route add --help)\n")


def test_bad_rates_sent_by_hand_are_422(server: KapowServer) -> None:
    for rate in ('{"requests": 0, "per": 1}', '{"requests": 1, "per": 1, "key": "moon"}', '{"requests": 1}'):
        body = f'{{"method": "GET", "url_pattern": "/x", "command": "true", "rate": {rate}}}'
        answer = server.curl_control("-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-d", body,
                                     server.control + "/routes")  # fmt: skip
        assert answer.stdout == "422", rate


def test_a_preflight_is_answered_by_the_server(either: KapowServer, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    tokens = tmp_path / "tokens"
    tokens.write_text("t\n")
    either.add_route(
        "/api", f"touch {ran}; echo ok | kapow set /response/body", "-X", "PUT",
        "--cors", "https://app.example", "--cors-header", "Content-Type", "--cors-header", "X-Token",
        "--cors-max-age", "60", "--auth-bearer", str(tokens),
    )  # fmt: skip
    answer = curl(
        "-s", "-D", "-", "-o", "/dev/null", "-X", "OPTIONS",
        "-H", "Origin: https://app.example", "-H", "Access-Control-Request-Method: PUT",
        "-H", "Access-Control-Request-Headers: x-token, x-other", either.user + "/api",
    ).stdout  # fmt: skip
    head = answer.splitlines()
    assert head[0].startswith("HTTP/1.1 204"), answer
    got = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in head[1:] if ":" in line}
    assert got["access-control-allow-origin"] == "https://app.example"
    assert got["access-control-allow-methods"] == "PUT"
    assert got["access-control-allow-headers"] == "X-Token"
    assert got["access-control-max-age"] == "60"
    assert got["vary"] == "Origin"
    assert "access-control-allow-credentials" not in got
    foreign = curl(
        "-s", "-D", "-", "-o", "/dev/null", "-X", "OPTIONS", "-H", "Origin: https://evil.example",
        "-H", "Access-Control-Request-Method: PUT", either.user + "/api",
    ).stdout  # fmt: skip
    assert foreign.startswith("HTTP/1.1 403") and "access-control" not in foreign.lower()
    assert not ran.exists()  # no process, and no authentication, for a preflight
    real = curl("-s", "-D", "-", "-X", "PUT", "-H", "Origin: https://app.example", "-H", "Authorization: Bearer t",
                either.user + "/api").stdout  # fmt: skip
    assert "Access-Control-Allow-Origin: https://app.example" in real and real.endswith("ok\n")
    refused = curl(
        "-s", "-D", "-", "-X", "PUT", "-H", "Origin: https://app.example", either.user + "/api"
    ).stdout
    assert (
        refused.startswith("HTTP/1.1 401") and "Access-Control-Allow-Origin: https://app.example" in refused
    )


def test_any_origin_and_credentials(server: KapowServer) -> None:
    server.add_route("/any", "true", "--cors", "*")
    server.add_route("/creds", "true", "--cors", "https://a.example", "--cors-credentials")
    preflight = ("-X", "OPTIONS", "-H", "Access-Control-Request-Method: GET")
    star = curl("-s", "-D", "-", *preflight, "-H", "Origin: https://x.example", server.user + "/any").stdout
    assert "Access-Control-Allow-Origin: *" in star
    creds = curl(
        "-s", "-D", "-", *preflight, "-H", "Origin: https://a.example", server.user + "/creds"
    ).stdout
    assert "Access-Control-Allow-Origin: https://a.example" in creds
    assert "Access-Control-Allow-Credentials: true" in creds
    refused = server.kapow("route", "add", "--cors", "*", "--cors-credentials", "/no", "-c", "true")
    assert refused.returncode == 1
    plain_options = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "OPTIONS", server.user + "/any")
    assert plain_options.stdout == "405"  # not a preflight: no route takes OPTIONS


def test_each_client_has_a_bucket_of_its_own_unless_the_route_shares_one(either: KapowServer) -> None:
    either.add_route("/c", "true", "--rate", "2/h")
    either.add_route("/shared", "true", "--rate", "2/h", "--rate-key", "route")
    one, two = ("--interface", "127.0.0.1"), ("--interface", "127.0.0.2")
    assert codes(either, "/c", 3, *one) == ["200", "200", "429"]
    assert codes(either, "/c", 3, *two) == ["200", "200", "429"]  # a bucket of its own
    assert codes(either, "/shared", 2, *one) == ["200", "200"]
    assert codes(either, "/shared", 1, *two) == ["429"]  # one bucket for the whole route
