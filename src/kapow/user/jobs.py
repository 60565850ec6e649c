# -*- test-case-name: tests.e2e.test_jobs -*-
"""
Jobs (SPEC.md §12, route field ``job``): a request answered 202 at once,
its process run as usual, and what it writes to ``/response/*`` kept as the
job's result instead of being sent, for ``GET /_jobs/{id}`` and
``GET /_jobs/{id}/result``.

A job's handler reads and writes a :class:`JobRequest`: the client's
request as it arrived (its body kept), and a response that is kept rather
than sent. Where jobs are kept is a :class:`JobBook`: :class:`Jobs` in the
process that keeps the history (the whole server, or the main process of
``--workers``), or, in a worker, one that asks the main process.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IAddress
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from kapow.core.routes import Route
from kapow.core.runs import JobResult, RunRecord
from kapow.user.run_record import described
from kapow.web.errors import phrase

__all__ = [
    "DEFAULT_JOBS_PATH",
    "DEFAULT_JOB_OUTPUT_MAX",
    "JOB_STATES",
    "JobBook",
    "JobHistory",
    "JobRequest",
    "Jobs",
    "ended_unrun",
    "job_record",
    "kept_guard",
]

#: What ``GET /_jobs/{id}`` says of a job: waiting for a slot, its process running, or over.
JOB_STATES = ("queued", "running", "done")
#: Where jobs are asked for when ``--jobs-path`` is not given.
DEFAULT_JOBS_PATH = "/_jobs"
#: The most bytes of a job's body kept when ``--job-output-max`` is not given.
DEFAULT_JOB_OUTPUT_MAX = 1024 * 1024


def job_record(job_id: str, route: Route, request: Request, since: float, server: str) -> RunRecord:
    """
    The record of a job that has not ended yet: what is known of it, and
    the ``allow`` and ``auth`` of its route, kept with it (``_guard``).
    """
    record: RunRecord = {
        **described(route, request, job_id, since, server),
        "duration_s": None,
        "status": None,
        "outcome": None,
        "exit_status": None,
        "signal": None,
        "bytes_in": None,
        "bytes_out": None,
        "mode": "http",
        "job": True,
    }
    return kept_guard(record, route)


def kept_guard(record: RunRecord, route: Route) -> RunRecord:
    """``record`` with the ``allow`` and ``auth`` of its ``route`` kept in it (``_guard``), if it has any."""
    if route.auth:
        record["_guard"] = dict(route.auth)
    return record


def ended_unrun(
    book: JobBook, job: JobRequest, job_id: str, route: Route, now: float, server: str, answer: bytes
) -> None:
    """A job answered without a process (refused once queued, or unable to start): ``answer`` is its result."""
    job.write(answer)
    record = job_record(job_id, route, job.as_request(), now, server)
    record.update(status=job.code, duration_s=0.0, truncated=job.truncated, stderr_tail="")
    book.done(record, job.result())


class _Kept:
    """The connection of a :class:`JobRequest`: nothing to cut (a job's timeout ends its process)."""

    def loseConnection(self) -> None:
        pass


class _Channel:
    transport = _Kept()


class JobRequest:
    """
    The request of a job's handler: what it reads is the client's request
    (its body kept, since the client's own request is over once answered
    202); what it writes is kept, the body up to ``limit`` bytes.

    :param request: the client's request; its body is taken from it now.
    :param limit: the most body bytes kept (``--job-output-max``).
    """

    channel = _Channel()

    def __init__(self, request: Request, limit: int) -> None:
        self._request = request
        self.limit = limit
        self.content = request.content
        request.content = io.BytesIO()  # the client's request is over before the job: keep its body here
        self.method, self.uri, self.path = request.method, request.uri, request.path
        self.clientproto = request.clientproto
        self.requestHeaders = request.requestHeaders
        self.kapow_auth_user = getattr(request, "kapow_auth_user", None)
        self.code = 200
        self.code_message: bytes | None = None
        self.responseHeaders = Headers()
        self.body = bytearray()
        self.truncated = False
        self.sentLength = 0
        self.startedWriting = False
        self.finished = False
        self._disconnected = False
        #: called once the response is complete
        self.on_finish: Callable[[], None] | None = None

    # what the handler reads
    def getClientAddress(self) -> IAddress:
        return self._request.getClientAddress()

    def getHeader(self, name: bytes) -> bytes | None:
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    # what the handler writes: kept
    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code, self.code_message = code, message

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def write(self, data: bytes) -> None:
        self.startedWriting = True
        room = self.limit - len(self.body)
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        self.body += data
        self.sentLength = len(self.body)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass  # nothing is sent: nothing to wait for

    def unregisterProducer(self) -> None:
        pass

    def notifyFinish(self) -> Deferred[None]:
        return Deferred()  # its client is never lost: the job runs on without one

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            if self.on_finish is not None:
                self.on_finish()

    def result(self) -> JobResult:
        """The kept response."""
        reason = self.code_message or RESPONSES.get(self.code) or phrase(self.code) or b"Unknown Status"
        headers = [
            (name, value) for name, values in self.responseHeaders.getAllRawHeaders() for value in values
        ]
        return JobResult(self.code, reason.decode("latin-1"), headers, bytes(self.body), self.truncated)

    def as_request(self) -> Request:
        """This, for the handler that takes a twisted.web request."""
        return cast(Request, self)


class JobHistory(Protocol):
    """Where finished jobs are kept for good (:class:`kapow.history.writer.HistoryWriter`)."""

    def add(self, record: RunRecord, result: JobResult | None = None) -> None: ...

    def get(self, run_id: str) -> Deferred[RunRecord | None]: ...

    def job_result(self, run_id: str) -> Deferred[JobResult | None]: ...


class JobBook(Protocol):
    """Where the jobs are known."""

    def started(self, record: RunRecord, state: str) -> None:
        """A job is ``queued`` or ``running`` (``record``: what is known of it)."""

    def done(self, record: RunRecord, result: JobResult) -> None:
        """A job is over."""

    def status(self, job_id: str) -> Deferred[tuple[str, RunRecord] | None]:
        """(state, record) of a job, or ``None`` if it is unknown."""

    def result(self, job_id: str) -> Deferred[JobResult | None]:
        """The result of a finished job, or ``None`` if it has none (yet)."""


@dataclass
class _Live:
    state: str
    record: RunRecord


class Jobs:
    """
    The jobs of the process that keeps the history: queued and running ones
    here and in the history (with their ``_state``, for the other servers
    of a cluster), finished ones in the history (and the last few here too,
    so that a client asking at once finds them before the history has
    written them).

    :param history: where finished jobs are kept, if anywhere.
    :param recent: how many finished jobs are kept here.
    """

    def __init__(self, history: JobHistory | None, recent: int = 256) -> None:
        self.history = history
        self.recent = recent
        self._live: dict[str, _Live] = {}
        self._done: OrderedDict[str, tuple[RunRecord, JobResult]] = OrderedDict()

    def started(self, record: RunRecord, state: str) -> None:
        self._live[record["id"]] = _Live(state, record)
        if self.history is not None:  # so that every server sharing the history knows of it
            self.history.add({**record, "_state": state})

    def done(self, record: RunRecord, result: JobResult) -> None:
        self._live.pop(record["id"], None)
        self._done[record["id"]] = (record, result)
        while len(self._done) > self.recent:
            self._done.popitem(last=False)
        if self.history is not None:
            self.history.add(record, result)

    def status(self, job_id: str) -> Deferred[tuple[str, RunRecord] | None]:
        live = self._live.get(job_id)
        if live is not None:
            return succeed((live.state, live.record))
        done = self._done.get(job_id)
        if done is not None:
            return succeed(("done", done[0]))
        if self.history is None:
            return succeed(None)
        return self.history.get(job_id).addCallback(_done_job)

    def result(self, job_id: str) -> Deferred[JobResult | None]:
        if job_id in self._live:
            return succeed(None)
        done = self._done.get(job_id)
        if done is not None:
            return succeed(done[1])
        if self.history is None:
            return succeed(None)
        return self.history.job_result(job_id)


def _done_job(record: RunRecord | None) -> tuple[str, RunRecord] | None:
    """A job's state and record as the history has them: ``_state`` until it is over."""
    if record is None or not record.get("job"):
        return None
    return record.get("_state", "done"), record
