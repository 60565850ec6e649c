"""
Serving the metrics of :mod:`kapow.core.metrics` (docs/howto/operations.rst):
``GET /metrics`` on ``--metrics-bind``, and the data API's site that counts
its answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from kapow.core.metrics import Metrics, Snapshot, exposition, merge
from kapow.web.errors import QuietSite

log = Logger()

#: Returns the snapshots of the other processes: a list, or a Deferred of one.
Others = Callable[[], list[Snapshot] | Deferred[list[Snapshot]]]

#: The content type of the Prometheus text format, as prometheus_client gives it.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class MetricsResource(Resource):
    """
    ``GET /metrics``: the counts of this process and, with ``--workers``, of
    every worker, added up.

    :param own: this process's counts.
    :param others: returns the snapshots of the other processes (a list, or a
        Deferred of one).
    """

    isLeaf = True

    def __init__(self, own: Metrics, others: Others = list) -> None:
        super().__init__()
        self.own = own
        self.others = others

    def render_GET(self, request: Request) -> bytes | int:
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Not Found: the metrics are at /metrics\n"

        def send(snapshots: list[Snapshot]) -> None:
            body = exposition(merge([self.own.snapshot(), *snapshots]))
            request.setHeader(b"Content-Type", CONTENT_TYPE)
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("metrics could not be collected", failure)
            request.setResponseCode(500)
            request.finish()

        # maybeDeferred waits for a Deferred that others() returns; its hint does not say so
        snapshots = cast(Deferred[list[Snapshot]], maybeDeferred(self.others))
        snapshots.addCallback(send).addErrback(failed)
        return NOT_DONE_YET


class CountingQuietSite(QuietSite):
    """The data API's site, counting its answers by status code.

    :param metrics: where they are counted.
    """

    def __init__(self, resource: IResource, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.metrics = metrics

    def log(self, request: http.Request) -> None:
        self.metrics.data_request(request.code)
