# -*- test-case-name: tests.unit.test_user_api -*-
"""
A handler's life in the user interface: its process started, its deadline
and its client watched, ended when the control API kills it, and its
response completed when the process exits (SPEC.md §3).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from kapow.core.metrics import Metrics
from kapow.core.routes import Match
from kapow.core.runs import RunRecord
from kapow.handlers.admission import Admission
from kapow.handlers.governor import Governor
from kapow.handlers.handler import Handler, HandlerRegistry
from kapow.handlers.spawn import ExitCallback, ProcessStream
from kapow.streams.events import EventStream
from kapow.streams.websocket import SERVER_ERROR, ProcessWebSocket, accept
from kapow.user.answers import internal_error
from kapow.user.jobs import JobBook, JobRequest, ended_unrun, job_record, kept_guard
from kapow.user.run_record import outcome_of, run_record

__all__ = ["HandlerSpawner", "Runner"]

log = Logger()
_T = TypeVar("_T")


class HandlerSpawner(Protocol):
    """What starts the handlers' processes (:class:`kapow.handlers.spawn.Spawner`)."""

    #: whether handlers' output is logged (and so are their starts)
    debug: bool

    def start(
        self,
        handler_id: str,
        argv: Sequence[str],
        on_exit: ExitCallback,
        stdin: int | None = None,
        limits: Mapping[str, int] | None = None,
        stream: ProcessStream | None = None,
        stderr_tail: bytearray | None = None,
    ) -> Deferred[int]:
        """
        Start ``argv`` for handler ``handler_id`` in a process group of its
        own; ``on_exit`` is never called before the result fires.

        :param stdin: a descriptor for its stdin, closed by the caller once
            the result fired; ``/dev/null`` if ``None``.
        :param limits: its resource limits.
        :param stream: what its stdout (and stdin) are pipes to, if anything.
        :param stderr_tail: where to keep the end of its stderr, if anywhere.
        :return: fires with the process group id, or fails if it cannot start.
        """


@dataclass(eq=False)
class Runner:
    """
    Starts the handlers' processes and sees each through to its exit.

    :param handlers: where handlers are registered by id.
    :param spawner: starts their processes.
    :param governor: times them and ends their process groups.
    :param admission: is told when an admitted handler is over.
    :param clock: the reactor's clock, for WebSocket and event-stream routes.
    :param metrics: where handlers are counted, if anywhere.
    :param history: given the run record of every handler whose process
        ended, if the history is kept.
    :param jobs: told of every job that starts to run, and of its end (its
        record then goes there, not to ``history``).
    :param server_name: the server's name in the records (``--server-name``).
    """

    handlers: HandlerRegistry
    spawner: HandlerSpawner
    governor: Governor
    admission: Admission
    clock: IReactorTime
    metrics: Metrics | None = None
    history: Callable[[RunRecord], None] | None = None
    jobs: JobBook | None = None
    server_name: str = ""

    def start(self, request: Request, found: Match, handler_id: str | None = None) -> bytes | None:
        """
        Create the handler of an admitted ``request`` (under ``handler_id``,
        or a fresh id) and start its process.

        :return: a 500 answer if it cannot start now; else ``None``: the
            request is the handler's, answered 500 here if its process
            cannot start after all.
        """
        route = found.route
        handler = self.handlers.create(route, found.matches, request, handler_id)
        request.kapow_handler_id = handler.id  # type: ignore[attr-defined]  # our mark, read by the site
        try:
            stdin = handler.stdin() if route.stdin else None
        except OSError as e:
            self._not_started(handler, str(e))
            if self.metrics is not None:
                self.metrics.spawn_failed(route)
            return internal_error(request)
        self.governor.started(handler.id, route, None, lambda elapsed: self._timed_out(handler, elapsed))
        handler.on_client_lost = lambda: self._client_lost(handler)
        if self.metrics is not None:
            self.metrics.handler_started(route)
        stream = self._stream(handler)
        if route.job and self.jobs is not None:
            handler.stderr_tail = bytearray()
            running = job_record(handler.id, route, request, self.clock.seconds(), self.server_name)
            self.jobs.started(running, "running")
        spawned = self.spawner.start(
            handler.id,
            route.argv(),
            lambda status, sig: self._exited(handler, status, sig),
            stdin,
            limits=route.limits,
            stream=stream,
            stderr_tail=handler.stderr_tail,
        )
        if stdin is not None:  # the child has its own once the spawn is over
            spawned.addBoth(_closing, stdin)
        spawned.addCallbacks(
            self._spawned, self._spawn_failed, callbackArgs=(handler,), errbackArgs=(handler,)
        )
        return None

    def _stream(self, handler: Handler) -> ProcessWebSocket | EventStream | None:
        """The stream of a WebSocket route (the upgrade completed now) or an event-stream route."""
        route, request = handler.route, handler.request
        stream: ProcessWebSocket | EventStream
        if route.mode == "websocket":
            metrics = self.metrics
            stream = ProcessWebSocket(
                request,
                self.clock,
                binary=route.messages == "binary",
                max_message=route.effective_max_message,
                ping=route.effective_ping,
                counted=None if metrics is None else lambda way: metrics.websocket_message(route, way),
                opened=None if metrics is None else lambda now: metrics.websocket_open(route, now),
            )
            accept(request, stream)
        elif route.mode == "events":
            stream = EventStream(request, route.effective_heartbeat, self.clock, route.effective_max_message)
        else:
            return None
        handler.stream = stream
        return stream

    def going_away(self) -> None:
        """A graceful stop: every live stream is told (WebSocket connections close with 1001)."""
        for handler in self.handlers.live():
            if handler.stream is not None:
                handler.stream.going_away()

    def kill(self, handler_id: str) -> bool:
        """
        End a running handler: SIGTERM to its process group now, SIGKILL
        after the grace period; its response completes when its process
        exits. ``False`` if no such handler runs.
        """
        handler = self.handlers.get(handler_id)
        if handler is None or self.governor.started_at(handler_id) is None:
            return False
        log.info(
            "handler {id} of route {route}: killed over the control API: ending its process group",
            id=handler.id, route=handler.route.id,
        )  # fmt: skip
        handler.ended_by = "killed"
        self.governor.terminate(handler_id)
        return True

    def _spawned(self, pgid: int, handler: Handler) -> None:
        if self.spawner.debug:  # an event per request costs, even filtered out
            log.debug("handler {id} started: pid {pid}", id=handler.id, pid=pgid)
        self.governor.spawned(handler.id, pgid)

    def _spawn_failed(self, failure: Failure, handler: Handler) -> None:
        self.governor.exited(handler.id)
        self._not_started(handler, failure.getErrorMessage())
        if self.metrics is not None:
            self.metrics.handler_ended(handler.route, None)
        if isinstance(handler.stream, ProcessWebSocket):  # upgraded already: no HTTP answer any more
            handler.stream.close(SERVER_ERROR, "cannot start")
            return
        request = handler.request
        if handler.route.job and self.jobs is not None:  # over before it ran: its result is the 500
            job = cast(JobRequest, request)
            now = self.clock.seconds()
            ended_unrun(
                self.jobs, job, handler.id, handler.route, now, self.server_name, internal_error(request)
            )
            return
        if not request._disconnected and not request.finished:
            request.write(internal_error(request))
            request.finish()

    def _not_started(self, handler: Handler, why: str) -> None:
        """Give up a handler whose process could not start."""
        log.error(
            "handler {id}: route {route} cannot start: {why}",
            id=handler.id, route=handler.route.id, why=why,
        )  # fmt: skip
        self.handlers.forget(handler)
        handler.abandon()
        self.admission.release(handler.route)

    def _exited(self, handler: Handler, status: int | None, signal: int | None) -> None:
        started = self.governor.started_at(handler.id)
        error_status = handler.route.error_status
        error_applied = True
        if error_status is not None and (status or signal is not None):
            error_applied = handler.fail(error_status)
        self.handlers.forget(handler)
        # it refers to the handler: dropped, handler and request are freed at
        # once instead of by the garbage collector (a cycle per request)
        handler.on_client_lost = None
        # its slot before its response: a client that sends its next request
        # as soon as it has this answer finds the slot free (from a worker,
        # the message that gives it back leaves before the answer)
        self.admission.release(handler.route)
        # the response next: the rest is bookkeeping the client need not wait for
        handler.finish(failed=bool(status) or signal is not None)
        elapsed = self.governor.exited(handler.id)
        if self.metrics is not None:
            self.metrics.handler_ended(handler.route, outcome_of(handler, status, signal))
        if signal is not None:
            log.info(
                "handler {id} killed by signal {signal} after {elapsed:.3f}s",
                id=handler.id, signal=signal, elapsed=elapsed,
            )  # fmt: skip
        elif status:
            log.info("handler {id} exited with status {status}", id=handler.id, status=status)
        if not error_applied:
            log.info(
                "handler {id} failed after its response started: status {code} not applied",
                id=handler.id, code=error_status,
            )  # fmt: skip
        if started is None:
            return
        if handler.stderr_tail is not None and self.jobs is not None:
            job = cast(JobRequest, handler.request)
            record = run_record(handler, started, elapsed, status, signal, self.server_name)
            tail = handler.stderr_tail.decode("utf-8", "replace")
            # its response was kept, not sent: its status is the one kept, body or not
            record.update(job=True, status=job.code, stderr_tail=tail, truncated=job.truncated)
            self.jobs.done(kept_guard(record, handler.route), job.result())
        elif self.history is not None:
            self.history(run_record(handler, started, elapsed, status, signal, self.server_name))

    def _timed_out(self, handler: Handler, elapsed: float) -> None:
        log.warn(
            "handler {id} of route {route} timed out after {elapsed:.3f}s: ending its process group",
            id=handler.id, route=handler.route.id, elapsed=elapsed,
        )  # fmt: skip
        self.handlers.forget(handler)
        handler.ended_by = "timeout"
        handler.time_out()
        self.governor.terminate(handler.id)

    def _client_lost(self, handler: Handler) -> None:
        if self.governor.keeps_running_on_disconnect(handler.route):
            log.info("handler {id}: client disconnected; the handler keeps running", id=handler.id)
            return
        log.info(
            "handler {id} of route {route}: client disconnected: ending its process group",
            id=handler.id, route=handler.route.id,
        )  # fmt: skip
        self.handlers.forget(handler)
        handler.ended_by = "disconnect"
        self.governor.terminate(handler.id)


def _closing(result: _T, fd: int) -> _T:
    """Close ``fd`` and pass ``result`` on."""
    os.close(fd)
    return result
