"""
Metrics end to end: a real server with --metrics-bind (alone and with
--workers 2) after a known mix of requests, scraped over HTTP and parsed
with prometheus_client's own parser.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.kapowserver import KapowServer, curl, wait_for


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture(params=[(), ("--workers", "2")], ids=["one", "workers"])
def measured(request: Any, start_server: Any, tmp_path: Path) -> tuple[KapowServer, str]:
    server = start_server(extra=("--metrics-bind", "127.0.0.1:0", *request.param))
    url = server.wait_log(r"metrics interface listening on (\S+)").group(1) + "/metrics"
    return server, url


def test_a_known_mix_of_requests_shows_exactly_those_counts(measured: Any, tmp_path: Path) -> None:
    server, url = measured
    (tmp_path / "tokens").write_text("right\n")
    ok = server.add_route("/ok", "echo ok | kapow set /response/body")
    fail = server.add_route("/fail", "exit 3")
    slow = server.add_route("/slow", "sleep 30", "--timeout", "0.5")
    guarded = server.add_route("/guarded", "touch never", "--auth-bearer", str(tmp_path / "tokens"))
    codes = [
        curl("-o", "/dev/null", "-w", "%{http_code}", server.user + path).stdout
        for path in ("/ok", "/ok", "/fail", "/slow", "/guarded", "/nowhere")
    ]
    assert codes == ["200", "200", "200", "504", "401", "404"]

    def route(r: dict) -> dict[str, str]:
        return {"route_id": r["id"], "pattern": r["url_pattern"]}

    def settled() -> dict | None:
        samples = scrape(url)
        exits = sum(v for (name, _), v in samples.items() if name == "kapow_handler_exits_total")
        return samples if exits == 4 else None

    samples = wait_for(settled, 15, "four handler exits")
    assert isinstance(samples, dict)
    assert value(samples, "kapow_requests_total", **route(ok), method="GET", code="200") == 2
    assert value(samples, "kapow_requests_total", **route(fail), method="GET", code="200") == 1
    assert value(samples, "kapow_requests_total", **route(slow), method="GET", code="504") == 1
    assert value(samples, "kapow_requests_total", **route(guarded), method="GET", code="401") == 1
    assert value(samples, "kapow_requests_total", route_id="", pattern="", method="GET", code="404") == 1
    assert sum(v for (name, _), v in samples.items() if name == "kapow_requests_total") == 6

    assert value(samples, "kapow_handler_exits_total", **route(ok), outcome="ok") == 2
    assert value(samples, "kapow_handler_exits_total", **route(fail), outcome="error") == 1
    assert value(samples, "kapow_handler_exits_total", **route(slow), outcome="timeout") == 1
    assert value(samples, "kapow_refused_total", **route(guarded), why="auth") == 1
    assert sum(v for (name, _), v in samples.items() if name == "kapow_refused_total") == 1
    assert not [k for k in samples if k[0] == "kapow_spawn_failures_total"]
    for r in (ok, fail, slow):
        assert value(samples, "kapow_handlers_running", **route(r)) == 0

    assert value(samples, "kapow_request_duration_seconds_count", **route(ok)) == 2
    assert value(samples, "kapow_request_duration_seconds_bucket", **route(slow), le="0.25") == 0
    assert value(samples, "kapow_request_duration_seconds_bucket", **route(slow), le="+Inf") == 1
    assert value(samples, "kapow_request_duration_seconds_sum", **route(slow)) >= 0.5
    # each /ok handler wrote its body through the data API once
    assert value(samples, "kapow_data_api_requests_total", code="200") == 2
    assert value(samples, "process_cpu_seconds_total") is not None
    assert not (tmp_path / "never").exists()


def test_a_running_handler_is_counted_while_it_runs(measured: Any, tmp_path: Path) -> None:
    server, url = measured
    gate = tmp_path / "gate"
    held = server.add_route("/held", f"while [ ! -e {gate} ]; do sleep 0.05; done")
    import subprocess

    client = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", server.user + "/held"])
    try:
        labels = {"route_id": held["id"], "pattern": "/held"}
        wait_for(lambda: value(scrape(url), "kapow_handlers_running", **labels) == 1, 10, "one running")
        gate.touch()
        assert client.wait(10) == 0
        wait_for(lambda: value(scrape(url), "kapow_handlers_running", **labels) == 0, 10, "none running")
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def test_only_metrics_is_served(measured: Any) -> None:
    _server, url = measured
    assert curl("-o", "/dev/null", "-w", "%{http_code}", url.replace("/metrics", "/other")).stdout == "404"


def test_queued_requests_and_killed_handlers(measured: Any, tmp_path: Path) -> None:
    import json
    import subprocess

    server, url = measured
    held = server.add_route("/one", "sleep 1000", "--max-concurrency", "1", "--queue", "1")
    labels = {"route_id": held["id"], "pattern": "/one"}
    clients = [subprocess.Popen(["curl", "-sS", "-o", "/dev/null", server.user + "/one"]) for _ in range(2)]
    try:
        wait_for(lambda: value(scrape(url), "kapow_handlers_running", **labels) == 1, 10, "one running")
        wait_for(lambda: value(scrape(url), "kapow_handlers_queued", **labels) == 1, 10, "one queued")
        for handler in json.loads(server.kapow("handler", "list").stdout):
            if handler["state"] != "queued":
                assert server.kapow("handler", "kill", handler["id"]).returncode == 0
        wait_for(
            lambda: value(scrape(url), "kapow_handler_exits_total", **labels, outcome="killed") == 1,
            10,
            "a kill",
        )
        wait_for(lambda: value(scrape(url), "kapow_handlers_queued", **labels) == 0, 10, "none queued")
    finally:
        for handler in json.loads(server.kapow("handler", "list").stdout):
            server.kapow("handler", "kill", handler["id"])
        for client in clients:
            client.kill()
            client.wait()
