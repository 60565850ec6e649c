"""
The main process's side of ``--workers N`` (docs/howto/scale-out.rst): it
opens the user interface's listening socket but never accepts on it, starts
N worker processes that do, sends each the whole route table and every
change to it, decides the limits that must hold across workers, replaces a
worker that dies, and stops them all gracefully with itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    gatherResults,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import (
    IProcessTransport,
    IReactorProcess,
    IReactorSocket,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from kapow.core.metrics import Snapshot
from kapow.core.routes import DEFAULT_QUEUE_TIMEOUT, RouteTable
from kapow.core.runs import JobResult, RunRecord
from kapow.data.handoff import Taker, sender
from kapow.handlers.admission import ServerQueue, Slots, Want
from kapow.handlers.containment import Containment
from kapow.handlers.listing import HandlerShown
from kapow.handlers.procfs import processes
from kapow.handlers.rates import Rates
from kapow.server.workers.messages import (
    BODY_PART,
    DATA_FD,
    MAIN_FD,
    USER_FD,
    Admit,
    HandlerInfo,
    Handlers,
    JobBody,
    JobDone,
    JobResultPart,
    JobStarted,
    JobStatus,
    Kill,
    MetricsPart,
    Release,
    Reload,
    Routes,
    Running,
    RunRecords,
    Serve,
    Stop,
    TakeToken,
    Withdraw,
    handler_worker,
    headers_of,
    headers_text,
    link_factory,
    table_parts,
)
from kapow.user.jobs import Jobs

__all__ = ["STOP_MARGIN", "IWorkersReactor", "MainLink", "WorkerPool", "handler_groups"]

log = Logger()

#: Seconds to wait before replacing a worker that died soon after its start.
RESTART_DELAY = 1.0
#: A worker that lived less than this many seconds died "soon after its start".
QUICK_DEATH = 5.0
#: Seconds a stopping worker gets beyond its own shutdown timeout before SIGKILL.
STOP_MARGIN = 5.0


class IWorkersReactor(IReactorProcess, IReactorSocket, IReactorTime):
    """
    What :class:`WorkerPool` needs of the reactor: it spawns the workers,
    adopts its end of the connection to each, and times their restarts and
    their stop.
    """


class MainLink(amp.AMP):
    """
    The main process's end of the connection to one worker.

    :param number: the worker's number.
    :param slots: the limits and queues shared by every worker.
    :param history: takes the run records the worker sends, if the history is kept.
    :param jobs: where the jobs of every worker are kept.
    :param rates: the rate limits of every worker's routes.
    """

    def __init__(
        self,
        number: int,
        slots: Slots,
        history: Callable[[RunRecord], None] | None = None,
        jobs: Jobs | None = None,
        rates: Rates | None = None,
    ) -> None:
        super().__init__()
        self.number = number
        self.slots = slots
        self.history = history
        self.jobs = jobs or Jobs(None)
        self.rates = rates or Rates(slots.clock, RouteTable())  # (a link on its own: its tests)
        self._bodies: dict[str, list[bytes]] = {}
        self.data_url: str | None = None
        self._held: Counter[tuple[str, bool]] = Counter()
        self._waiting: dict[int, Deferred[str | None]] = {}

    @Admit.responder
    def admit(
        self,
        route_id: str,
        limit: int | None = None,
        queue: int | None = None,
        queue_timeout: float | None = None,
        ticket: int | None = None,
    ) -> dict[str, Any] | Deferred[dict[str, Any]]:
        timeout = DEFAULT_QUEUE_TIMEOUT if queue_timeout is None else queue_timeout
        want = Want(route_id, limit, queue or 0, timeout)
        verdict = self.slots.admit(want)
        if not isinstance(verdict, Deferred):
            return self._answer(verdict, want)
        if ticket is not None:
            self._waiting[ticket] = verdict

        def answered(refusal: str | None) -> dict[str, Any]:
            if ticket is not None:
                self._waiting.pop(ticket, None)
            return self._answer(refusal, want)

        def withdrawn(failure: Failure) -> dict[str, Any]:
            failure.trap(CancelledError)
            return {"refusal": "withdrawn"}

        return verdict.addCallbacks(answered, withdrawn)

    def _answer(self, refusal: str | None, want: Want) -> dict[str, Any]:
        if refusal is not None:
            return {"refusal": refusal}
        self._held[(want.key, want.limit is not None)] += 1
        return {}

    @RunRecords.responder
    def run_records(self, records: str) -> dict[str, Any]:
        if self.history is not None:
            for record in json.loads(records):
                self.history(record)
        return {}

    @TakeToken.responder
    def take_token(self, route_id: str, rate: str, key: str) -> dict[str, Any]:
        wait = self.rates.take(route_id, json.loads(rate), key)
        return {"wait": wait or 0.0}

    @JobStarted.responder
    def job_started(self, record: str, state: str) -> dict[str, Any]:
        self.jobs.started(json.loads(record), state)
        return {}

    @JobBody.responder
    def job_body(self, id: str, part: bytes) -> dict[str, Any]:
        self._bodies.setdefault(id, []).append(part)
        return {}

    @JobDone.responder
    def job_done(
        self, record: str, status: int, reason: str, headers: str, truncated: bool
    ) -> dict[str, Any]:
        run = json.loads(record)
        body = b"".join(self._bodies.pop(run["id"], []))
        self.jobs.done(run, JobResult(status, reason, headers_of(headers), body, truncated))
        return {}

    @JobStatus.responder
    def job_status(self, id: str) -> Deferred[dict[str, Any]]:
        def answer(found: tuple[str, RunRecord] | None) -> dict[str, Any]:
            if found is None:
                return {"found": False, "state": "", "record": ""}
            return {"found": True, "state": found[0], "record": json.dumps(found[1])}

        return self.jobs.status(id).addCallback(answer)

    @JobResultPart.responder
    def job_result_part(self, id: str, part: int) -> Deferred[dict[str, Any]]:
        def answer(result: JobResult | None) -> dict[str, Any]:
            if result is None:
                return {"found": False, "status": 0, "reason": "", "headers": "[]", "truncated": False,
                        "body": b"", "parts": 0}  # fmt: skip
            parts = max(1, -(-len(result.body) // BODY_PART))
            return {
                "found": True,
                "status": result.status,
                "reason": result.reason,
                "headers": headers_text(result.headers),
                "truncated": result.truncated,
                "body": result.body[part * BODY_PART : (part + 1) * BODY_PART],
                "parts": parts,
            }

        return self.jobs.result(id).addCallback(answer)

    @Withdraw.responder
    def withdraw(self, ticket: int) -> dict[str, Any]:
        waiting = self._waiting.pop(ticket, None)
        if waiting is not None:
            waiting.cancel()
        return {}

    @Release.responder
    def release(self, route_id: str, limited: bool) -> dict[str, Any]:
        key = (route_id, limited)
        if self._held[key] > 0:
            self._held[key] -= 1
            self.slots.release(Want(route_id, 1 if limited else None))
        return {}

    def release_all(self) -> None:
        """Withdraw every request of this worker still queued, give back every slot it held (it is gone)."""
        waiting, self._waiting = self._waiting, {}
        for verdict in waiting.values():
            verdict.cancel()
        held, self._held = self._held, Counter()
        for (route_id, limited), count in held.items():
            for _ in range(count):
                self.slots.release(Want(route_id, 1 if limited else None))

    def push_routes(self, text: bytes) -> Deferred[dict[str, Any]]:
        """Send the whole route table; fires once the worker has it."""
        parts = table_parts(text)
        sent = [self.callRemote(Routes, part=part, last=n == len(parts) - 1) for n, part in enumerate(parts)]
        return sent[-1]


class _WorkerProcess(ProcessProtocol):
    def __init__(self, ended: Callable[[Failure], None]) -> None:
        self.ended = ended

    def processEnded(self, reason: Failure) -> None:
        self.ended(reason)


class _Worker:
    def __init__(self, number: int, link: MainLink, started: float) -> None:
        self.number = number
        self.link = link
        self.started = started
        # the main process's end of the socket connections to --data-bind go over
        self.data_socket, self.data_socket_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.data_socket.setblocking(False)
        self.take_data: Taker = sender(self.data_socket)
        self.process: IProcessTransport | None = None
        self.pid: int | None = None
        self.serving: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()


class WorkerPool(Service):
    """
    N worker processes serving the user interface; also the control API's
    view of the handlers, which they run
    (:class:`kapow.handlers.listing.HandlersListing`).

    :param reactor: spawns the workers, adopts descriptors, keeps time.
    :param count: how many workers.
    :param command: the command line of worker number N.
    :param environ: the workers' environment.
    :param routes: the route table, which lives here.
    :param user_socket: returns the listening socket's descriptor.
    :param control_url: returns the control API's URL, for the handlers.
    :param server_queue: ``--max-handlers`` and its queue.
    :param stop_timeout: seconds a worker may take to stop before SIGKILL.
    :param end_groups: ends process groups (SIGTERM, a grace period, SIGKILL),
        for the handlers a dead worker left behind.
    :param containment: gives each worker a cgroup of its own and ends what
        a dead worker left in it, if the server contains its handlers.
    :param history: takes the run records of the workers' handlers, if the
        history is kept.
    :param jobs: where the jobs of every worker are kept.
    """

    name = "workers"

    def __init__(
        self,
        reactor: IWorkersReactor,
        *,
        count: int,
        command: Callable[[int], Sequence[str]],
        environ: Mapping[str, str],
        routes: RouteTable,
        user_socket: Callable[[], int],
        control_url: Callable[[], str],
        server_queue: ServerQueue,
        stop_timeout: float,
        end_groups: Callable[[set[int]], Deferred[None]],
        containment: Containment | None = None,
        history: Callable[[RunRecord], None] | None = None,
        jobs: Jobs | None = None,
    ) -> None:
        self.reactor = reactor
        self.containment = containment
        self.history = history
        self.jobs = jobs or Jobs(None)
        self.rates = Rates(reactor, routes)
        self.end_groups = end_groups
        self.count = count
        self.command = command
        self.environ = dict(environ)
        self.routes = routes
        self.user_socket = user_socket
        self.control_url = control_url
        self.slots = Slots(reactor, server_queue)
        self.stop_timeout = stop_timeout
        self.workers: dict[int, _Worker] = {}
        self._first: list[Deferred[None]] = []
        self._stopping = False

    # -- life of the workers -------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for number in range(1, self.count + 1):
            self._first.append(self._start(number).serving)

    def serving(self) -> Deferred[list[None]]:
        """Fires once every worker of the first start serves."""
        return gatherResults(self._first)

    def _start(self, number: int) -> _Worker:
        link = MainLink(number, self.slots, self.history, self.jobs, self.rates)
        worker = _Worker(number, link, self.reactor.seconds())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, link_factory(link))
            process = worker.process = self.reactor.spawnProcess(
                _WorkerProcess(lambda reason: self._ended(worker, reason)),
                sys.executable,
                [sys.executable, *self.command(number)],
                env=self.environ,
                childFDs={
                    0: stdin,
                    1: 1,
                    2: 2,
                    USER_FD: self.user_socket(),
                    MAIN_FD: theirs.fileno(),
                    DATA_FD: worker.data_socket_theirs.fileno(),
                },
            )
        finally:
            ours.close()
            theirs.close()
            worker.data_socket_theirs.close()
            os.close(stdin)
        self.workers[number] = worker
        worker.pid = pid = process.pid
        assert pid is not None  # just started
        if self.containment is not None:
            # before it has the routes, hence before it can start any handler
            self.containment.enter_worker(number, pid)
        log.info("worker {n} started (pid {pid})", n=number, pid=worker.pid)
        link.push_routes(self._table())
        link.callRemote(Serve, control_url=self.control_url()).addCallbacks(
            lambda answer: self._serving(worker, answer["data_url"]),
            lambda failure: log.warn(
                "worker {n} did not start serving: {why}", n=number, why=failure.getErrorMessage()
            ),
        )
        return worker

    def _serving(self, worker: _Worker, data_url: str) -> None:
        worker.link.data_url = data_url
        if self.containment is not None:
            self.containment.watch(data_url)
        log.info("worker {n} serves (data API for its handlers: {url})", n=worker.number, url=data_url)
        worker.serving.callback(None)

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        worker.link.release_all()
        worker.data_socket.close()
        ended: Deferred[None] | None = None
        if worker.link.data_url is not None:
            orphans = handler_groups(worker.link.data_url)
            if orphans:
                log.warn(
                    "worker {n} left {count} handlers running: ending their process groups",
                    n=worker.number, count=len(orphans),
                )  # fmt: skip
                ended = self.end_groups(orphans)
        containment = self.containment
        if containment is not None:
            # whatever escaped its process group, once the groups had their grace period
            if ended is None:
                self._end_cgroup(containment, worker)
            else:
                ended.addBoth(lambda _: self._end_cgroup(containment, worker))
        if worker.link.transport is not None:
            worker.link.transport.loseConnection()
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        status, sig = getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None)
        if self._stopping:
            log.info("worker {n} stopped", n=worker.number)
        else:
            log.error(
                "worker {n} (pid {pid}) ended (status {status}, signal {signal}): starting another",
                n=worker.number, pid=worker.pid, status=status, signal=sig,
            )  # fmt: skip
            quick = self.reactor.seconds() - worker.started < QUICK_DEATH
            self.reactor.callLater(RESTART_DELAY if quick else 0, self._restart, worker)
        worker.ended.callback(None)

    def _end_cgroup(self, containment: Containment, worker: _Worker) -> None:
        assert worker.pid is not None  # it was started
        left = containment.end_worker(worker.pid)
        if left:
            log.warn("worker {n}: killed {count} processes left in its cgroup", n=worker.number, count=left)

    def _restart(self, worker: _Worker) -> None:
        if self._stopping or worker.number in self.workers:
            return
        replacement = self._start(worker.number)
        if not worker.serving.called:  # died before it served: its replacement stands for it
            replacement.serving.chainDeferred(worker.serving)

    # -- route changes, health -----------------------------------------------

    def _table(self) -> bytes:
        return json.dumps(self.routes.listing()).encode()

    def publish(self) -> Deferred[list[dict[str, Any] | None]]:
        """Send the route table to every worker; fires once each has it (or is gone)."""
        text = self._table()

        def failed(failure: Failure, number: int) -> None:
            log.warn("worker {n} did not take the routes: {why}", n=number, why=failure.getErrorMessage())

        return gatherResults(
            [w.link.push_routes(text).addErrback(failed, w.number) for w in list(self.workers.values())]
        )

    def stats(self) -> Deferred[dict[str, Any]]:
        """The fields of ``/health``: handlers of every worker, and the workers serving."""
        serving = [w for w in self.workers.values() if w.serving.called]
        answers = [w.link.callRemote(Running).addErrback(lambda _: {"handlers": 0}) for w in serving]
        return gatherResults(answers).addCallback(
            lambda found: {"handlers": sum(a["handlers"] for a in found), "workers": len(serving)}
        )

    def metrics_snapshots(self) -> Deferred[list[dict[str, Any]]]:
        """The metrics snapshot of every serving worker (one that does not answer is left out)."""

        @inlineCallbacks
        def fetch(worker: _Worker) -> Generator[Deferred[dict[str, Any]], dict[str, Any], Snapshot]:
            first = yield worker.link.callRemote(MetricsPart, part=0)
            texts = [first["text"]]
            for part in range(1, first["parts"]):
                answer = yield worker.link.callRemote(MetricsPart, part=part)
                texts.append(answer["text"])
            return json.loads("".join(texts) or "{}")

        def failed(failure: Failure, number: int) -> dict[str, Any]:
            log.warn("worker {n} gave no metrics: {why}", n=number, why=failure.getErrorMessage())
            return {}

        serving = [w for w in self.workers.values() if w.serving.called]
        return gatherResults([fetch(w).addErrback(failed, w.number) for w in serving])

    def reload(self) -> None:
        """Tell every worker to read its certificates and auth files again."""
        for worker in list(self.workers.values()):
            worker.link.callRemote(Reload)

    def data_taker(self, handler_id: str) -> Taker | None:
        """
        Who takes a connection to ``--data-bind`` that asks about
        ``handler_id``: the worker that runs it, any serving worker for an
        id no worker made, ``None`` if its worker is gone (or none serves).
        """
        number = handler_worker(handler_id)
        if number is None:
            candidates = list(self.workers.values())
        else:
            worker = self.workers.get(number)
            candidates = [] if worker is None else [worker]
        for candidate in candidates:
            if candidate.serving.called:
                return candidate.take_data
        return None

    # -- handlers on the control API -------------------------------------------

    def listing(self) -> Deferred[list[HandlerShown]]:
        """The live handlers of every worker, oldest first."""
        serving = [w for w in self.workers.values() if w.serving.called]
        return gatherResults([self._handlers_of(w) for w in serving]).addCallback(
            lambda found: sorted((h for part in found for h in part), key=lambda h: h["started"])
        )

    def _handlers_of(self, worker: _Worker) -> Deferred[list[HandlerShown]]:
        found: list[HandlerShown] = []

        def page(answer: dict[str, Any]) -> list[HandlerShown] | Deferred[list[HandlerShown]]:
            part = json.loads(answer["handlers"])
            found.extend(part)
            if answer["more"] and part:
                return maybeDeferred(worker.link.callRemote, Handlers, after=part[-1]["id"]).addCallback(page)
            return found

        def failed(failure: Failure) -> list[HandlerShown]:
            log.warn(
                "worker {n} did not list its handlers: {why}", n=worker.number, why=failure.getErrorMessage()
            )
            return found

        return maybeDeferred(worker.link.callRemote, Handlers, after="").addCallback(page).addErrback(failed)

    def handler_info(self, handler_id: str) -> Deferred[HandlerShown | None] | None:
        """One live handler, asked of the worker that runs it."""
        worker = self._worker_of(handler_id)
        if worker is None:
            return None
        return maybeDeferred(worker.link.callRemote, HandlerInfo, handler_id=handler_id).addCallback(
            lambda answer: json.loads(answer["handler"]) if answer.get("handler") is not None else None
        )

    def kill(self, handler_id: str) -> Deferred[bool] | bool:
        """End a live handler, in the worker that runs it."""
        worker = self._worker_of(handler_id)
        if worker is None:
            return False
        return worker.link.callRemote(Kill, handler_id=handler_id).addCallback(
            lambda answer: answer["killed"]
        )

    def _worker_of(self, handler_id: str) -> _Worker | None:
        number = handler_worker(handler_id)
        worker = None if number is None else self.workers.get(number)
        return worker if worker is not None and worker.serving.called else None

    # -- stopping -------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """Every worker stops gracefully; SIGKILL for any that outlives the stop timeout."""
        super().stopService()
        self._stopping = True
        workers = list(self.workers.values())
        if not workers:
            return succeed(None)
        for worker in workers:
            worker.link.callRemote(Stop, now=False)
        kill = self.reactor.callLater(self.stop_timeout, self._kill, workers)

        def stopped(_: object) -> None:
            if kill.active():
                kill.cancel()

        return gatherResults([w.ended for w in workers]).addBoth(stopped)

    def hurry(self) -> None:
        """Tell every worker to end its handlers now."""
        for worker in list(self.workers.values()):
            worker.link.callRemote(Stop, now=True)

    def _kill(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.warn("worker {n} did not stop in time: SIGKILL", n=worker.number)
                assert worker.process is not None  # it was started
                try:
                    worker.process.signalProcess(signal.SIGKILL)
                except ProcessExitedAlready:
                    pass


def handler_groups(data_url: str) -> set[int]:
    """
    The process groups of live handlers started with ``KAPOW_DATA_URL`` set
    to ``data_url`` (a worker's own data API): every handler leads a group of
    its own, and its environment as it started names its worker's data API.
    """
    marker = b"\0KAPOW_DATA_URL=" + data_url.encode() + b"\0"
    found = set()
    for pid, state, pgrp in processes():
        if pgrp != pid or state == b"Z":
            continue  # not a group leader, or dead
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = b"\0" + f.read()
        except OSError:
            continue
        if marker in environ:
            found.add(pid)
    return found
