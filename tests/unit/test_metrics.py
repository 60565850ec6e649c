"""
The counts behind /metrics (kapow.core.metrics): what one process counts, how the
counts of several workers add up, and the text a scrape gets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from kapow.core.metrics import Metrics, exposition, merge, refusal_kind, snapshot_parts


@dataclass
class FakeRoute:
    id: str
    url_pattern: str


A = FakeRoute("a", "/a/{x}")


def samples(text: bytes) -> dict:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def worker_counts() -> Metrics:
    metrics = Metrics(Clock())
    metrics.request_done(A, b"GET", 200, 0.003)
    metrics.request_done(A, b"GET", 200, 0.7)
    metrics.request_done(None, b"POST", 404, 0.0)
    metrics.handler_started(A)
    metrics.handler_ended(A, "ok")
    metrics.handler_started(A)
    metrics.handler_ended(A, None)
    metrics.refused_request(A, "auth")
    metrics.data_request(200)
    return metrics


def test_the_counts_of_workers_add_up_in_one_exposition() -> None:
    one, two = worker_counts(), worker_counts()
    two.handler_started(A)  # still running in the second
    # what travels from a worker: JSON text, in parts
    travelled = json.loads("".join(snapshot_parts(two, 40)))
    found = samples(exposition(merge([one.snapshot(), travelled])))
    route = (("pattern", "/a/{x}"), ("route_id", "a"))
    assert found[("kapow_requests_total", (("code", "200"), ("method", "GET"), *route))] == 4
    assert (
        found[
            ("kapow_requests_total", (("code", "404"), ("method", "POST"), ("pattern", ""), ("route_id", "")))
        ]
        == 2
    )
    assert found[("kapow_handler_exits_total", (("outcome", "ok"), *route))] == 2
    assert found[("kapow_spawn_failures_total", route)] == 2
    assert found[("kapow_handlers_running", route)] == 1
    assert found[("kapow_refused_total", (*route, ("why", "auth")))] == 2
    assert found[("kapow_data_api_requests_total", (("code", "200"),))] == 2
    assert found[("kapow_request_duration_seconds_count", route)] == 4
    assert found[("kapow_request_duration_seconds_bucket", (("le", "0.005"), *route))] == 2
    assert found[("kapow_request_duration_seconds_bucket", (("le", "0.5"), *route))] == 2
    assert found[("kapow_request_duration_seconds_bucket", (("le", "1.0"), *route))] == 4
    assert abs(found[("kapow_request_duration_seconds_sum", route)] - 1.406) < 1e-9
    assert ("process_cpu_seconds_total", ()) in found


def test_nothing_counted_still_names_every_family() -> None:
    text = exposition(merge([Metrics(Clock()).snapshot(), {}])).decode()
    for name in (
        "kapow_requests", "kapow_request_duration_seconds", "kapow_handlers_running", "kapow_handlers_queued",
        "kapow_handler_exits", "kapow_spawn_failures", "kapow_refused", "kapow_data_api_requests",
    ):  # fmt: skip
        assert re.search(rf"^# TYPE {name}(_total)? ", text, re.M), name


def test_refusal_reasons_map_to_their_kind() -> None:
    assert refusal_kind("the server is stopping") == "stopping"
    assert refusal_kind("route limit of 2 handlers reached") == "concurrency"
    assert refusal_kind("server limit of 9 handlers reached") == "concurrency"
    assert refusal_kind("route queue of 3 is full") == "queue_full"
    assert refusal_kind("server queue of 3 is full") == "queue_full"
    assert refusal_kind("waited 30s in the queue") == "queue_timeout"
    assert refusal_kind("killed over the control API while queued") is None
