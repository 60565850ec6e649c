"""
Prometheus metrics (``--metrics-bind``: see the metrics how-to,
docs/howto/operations.rst, and docs/reference/cli.rst).

While serving, the server only adds to plain counters keyed by tuples
(:class:`Metrics`); nothing is formatted per request. A scrape turns them
into metric families (:func:`families`), with the counts of every worker of
``--workers`` added up: each worker's :meth:`Metrics.snapshot` travels to the
main process as JSON, and :func:`merge` sums them.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from kapow.core.routes import Route

#: Upper bounds (seconds) of the request duration histogram's buckets.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

#: Why a request was refused before its handler started.
REFUSALS = ("concurrency", "queue_full", "queue_timeout", "auth", "rate", "stopping")

_COUNTERS = (
    "requests",
    "exits",
    "spawn_failures",
    "refused",
    "data_api",
    "websocket_messages",
    "history_dropped",
)
_GAUGES = ("running", "queued", "websocket_connections")

#: Counts as JSON: each name of :data:`_COUNTERS`, :data:`_GAUGES` and
#: ``durations`` to its rows, a row being the labels (texts, or a status code)
#: then the count (a number, or the bucket counts and sum of a histogram);
#: a list of mixed JSON values, hence ``Any``.
Snapshot = dict[str, list[list[Any]]]


class Clock(Protocol):
    """Gives the time, as a reactor's ``IReactorTime`` does."""

    def seconds(self) -> float:
        """The current time in seconds."""


def refusal_kind(reason: str) -> str | None:
    """Which of :data:`REFUSALS` an admission's refusal text is (``None``: an operator's kill)."""
    if reason.startswith("killed"):
        return None
    if "stopping" in reason:
        return "stopping"
    if "queue" in reason:
        return "queue_full" if "full" in reason else "queue_timeout"
    return "concurrency"


class Metrics:
    """
    The counts of one process.

    :param clock: gives the time (``seconds()``), for request durations.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        #: returns the route of every request waiting in a queue now, if queues are kept
        self.queued_now: Callable[[], Iterable[Route]] | None = None
        #: returns how many run records the history dropped, if this process keeps it
        self.dropped_now: Callable[[], int] | None = None
        self.history_dropped: Counter[tuple[()]] = Counter()
        self.requests: Counter[tuple[str, str, str, int]] = Counter()
        self.durations: dict[tuple[str, str], list[float]] = {}
        self.running: Counter[tuple[str, str]] = Counter()
        self.queued: Counter[tuple[str, str]] = Counter()
        self.exits: Counter[tuple[str, str, str]] = Counter()
        self.spawn_failures: Counter[tuple[str, str]] = Counter()
        self.refused: Counter[tuple[str, str, str]] = Counter()
        self.data_api: Counter[tuple[int]] = Counter()
        self.websocket_connections: Counter[tuple[str, str]] = Counter()
        self.websocket_messages: Counter[tuple[str, str, str]] = Counter()

    def request_done(self, route: Route | None, method: bytes, code: int, elapsed: float) -> None:
        """A user request was answered (``route``: ``None`` when none matched)."""
        key = ("", "") if route is None else (route.id, route.url_pattern)
        self.requests[(*key, method.decode("latin-1"), code)] += 1
        counts = self.durations.get(key)
        if counts is None:
            # one count per bucket and +Inf, then the sum
            counts = self.durations[key] = [0] * (len(BUCKETS) + 2)
        counts[bisect_left(BUCKETS, elapsed)] += 1
        counts[-1] += elapsed

    def handler_started(self, route: Route) -> None:
        self.running[(route.id, route.url_pattern)] += 1

    def handler_ended(self, route: Route, outcome: str | None) -> None:
        """A started handler is over: exited with ``outcome``, or never started (``None``)."""
        key = (route.id, route.url_pattern)
        self.running[key] -= 1
        if outcome is None:
            self.spawn_failures[key] += 1
        else:
            self.exits[(*key, outcome)] += 1

    def spawn_failed(self, route: Route) -> None:
        """A handler that was not counted as started could not start."""
        self.spawn_failures[(route.id, route.url_pattern)] += 1

    def refused_request(self, route: Route, why: str) -> None:
        self.refused[(route.id, route.url_pattern, why)] += 1

    def data_request(self, code: int) -> None:
        self.data_api[(code,)] += 1

    def websocket_open(self, route: Route, now: bool) -> None:
        """A WebSocket connection of ``route`` opened (``now``), or closed."""
        self.websocket_connections[(route.id, route.url_pattern)] += 1 if now else -1

    def websocket_message(self, route: Route, direction: str) -> None:
        """A WebSocket message of ``route`` went ``in`` or ``out``."""
        self.websocket_messages[(route.id, route.url_pattern, direction)] += 1

    def snapshot(self) -> Snapshot:
        """Every count as JSON-able lists of ``[*labels, value]``."""
        if self.dropped_now is not None:
            self.history_dropped[()] = self.dropped_now()
        data: Snapshot = {name: [[*key, n] for key, n in getattr(self, name).items()] for name in _COUNTERS}
        if self.queued_now is not None:
            queued = self.queued
            for key in queued:
                queued[key] = 0  # a route's series stays, at 0, once its queue is empty
            for route in self.queued_now():
                queued[(route.id, route.url_pattern)] += 1
        for name in _GAUGES:
            data[name] = [[*key, n] for key, n in getattr(self, name).items()]
        data["durations"] = [[*key, counts] for key, counts in self.durations.items()]
        return data


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The counts of several :meth:`Metrics.snapshot` added up."""
    totals: dict[str, dict[tuple[Any, ...], Any]] = {name: {} for name in (*_COUNTERS, *_GAUGES, "durations")}
    for snapshot in snapshots:
        for name in (*_COUNTERS, *_GAUGES):
            into = totals[name]
            for *key, n in snapshot.get(name, ()):
                into[tuple(key)] = into.get(tuple(key), 0) + n
        into = totals["durations"]
        for *key, counts in snapshot.get("durations", ()):
            had = into.get(tuple(key))
            into[tuple(key)] = (
                list(counts) if had is None else [a + b for a, b in zip(had, counts, strict=True)]
            )
    return {name: [[*key, value] for key, value in values.items()] for name, values in totals.items()}


def families(snapshot: Snapshot) -> Iterator[Metric]:
    """The metric families of a (merged) snapshot."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    route = ["route_id", "pattern"]

    def counter(name: str, doc: str, labels: list[str], rows: list[list[Any]]) -> Metric:
        family = CounterMetricFamily(name, doc, labels=labels)
        for *key, n in rows:
            family.add_metric([str(k) for k in key], n)
        return family

    yield counter(
        "kapow_requests", "User requests answered.", [*route, "method", "code"], snapshot["requests"]
    )
    histogram = HistogramMetricFamily(
        "kapow_request_duration_seconds", "Time from a request's arrival to its answer.", labels=route
    )
    for *key, counts in snapshot["durations"]:
        cumulative, buckets = 0, []
        for bound, n in zip((*map(repr, BUCKETS), "+Inf"), counts[:-1], strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        histogram.add_metric(key, buckets, counts[-1])
    yield histogram
    for name, field, doc in (
        ("kapow_handlers_running", "running", "Handler processes running."),
        ("kapow_handlers_queued", "queued", "Requests waiting for a free handler slot."),
        ("kapow_websocket_connections", "websocket_connections", "WebSocket connections open."),
    ):
        gauge = GaugeMetricFamily(name, doc, labels=route)
        for *key, n in snapshot[field]:
            gauge.add_metric(key, n)
        yield gauge
    yield counter(
        "kapow_handler_exits",
        "Handler processes ended, by outcome (ok, error, signal, timeout, disconnect, killed).",
        [*route, "outcome"],
        snapshot["exits"],
    )
    yield counter(
        "kapow_spawn_failures", "Handler processes that could not start.", route, snapshot["spawn_failures"]
    )
    yield counter(
        "kapow_refused",
        "Requests refused before a handler started (concurrency, queue_full, queue_timeout, auth, stopping).",
        [*route, "why"],
        snapshot["refused"],
    )
    yield counter("kapow_data_api_requests", "Data API requests answered.", ["code"], snapshot["data_api"])
    yield counter(
        "kapow_history_dropped",
        "Run records the history dropped: its database was out of reach too long.",
        [],
        snapshot["history_dropped"],
    )
    yield counter(
        "kapow_websocket_messages",
        "WebSocket messages received (in) and sent (out).",
        [*route, "direction"],
        snapshot["websocket_messages"],
    )


def exposition(snapshot: Snapshot) -> bytes:
    """The Prometheus text format of ``snapshot``, with this process's own metrics."""
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)

    class _Collected:
        def collect(self) -> Iterator[Metric]:
            return families(snapshot)

    registry.register(_Collected())
    return generate_latest(registry)


def snapshot_parts(metrics: Metrics, size: int) -> list[str]:
    """``metrics``' snapshot as JSON text cut into parts of at most ``size`` characters."""
    text = json.dumps(metrics.snapshot())
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]
