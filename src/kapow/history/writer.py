# -*- test-case-name: tests.unit.test_history_store -*-
"""
The run history from the reactor's side (SPEC.md §12): records handed over
without blocking, written in batches by one thread of their own, and reads
answered as Deferreds from the reactor's thread pool.

While the database cannot be reached (a PostgreSQL server stopped or
restarting, an SQLite file locked or its disk full) records wait in memory,
the oldest dropped beyond :data:`HOLD_RECORDS`, and the batch that failed
is tried again, then the ones behind it: stores replace a record written
again, so a batch that reached the database before its connection was lost
does no harm.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from kapow.core.runs import HistoryQuery, JobResult, RunRecord
from kapow.history.base import HistoryUnavailable, Store

__all__ = [
    "BATCH_BYTES",
    "BATCH_RECORDS",
    "BATCH_SECONDS",
    "HOLD_RECORDS",
    "RETRY_FIRST",
    "RETRY_MOST",
    "STOP_WAIT",
    "HistoryWriter",
]

log = Logger()

R = TypeVar("R")

#: A batch is written once it holds this many records, ...
BATCH_RECORDS = 1_000
#: ... or this many bytes of jobs' result bodies, ...
BATCH_BYTES = 16 * 1024 * 1024
#: ... or this long after its first record was handed over, whichever comes first.
BATCH_SECONDS = 0.2
#: The most records kept in memory while the database cannot be reached;
#: beyond them the oldest are dropped.
HOLD_RECORDS = 10_000
#: Seconds before a failed write is tried again: the first wait, doubled
#: after each failure up to the most.
RETRY_FIRST, RETRY_MOST = 0.5, 5.0
#: Seconds :meth:`HistoryWriter.stop` goes on trying to write what waits
#: before it gives it up as lost.
STOP_WAIT = 5.0
#: Seconds past :data:`STOP_WAIT` after which the stop no longer waits for
#: a write that does not return (the thread is left to finish on its own).
_STOP_GRACE = 20.0

#: A record and its job's result, as queued.
_Item = tuple[RunRecord, JobResult | None]


class HistoryWriter(Service):
    """
    Feeds ``store`` from the reactor: :meth:`add` queues a record for the
    writer thread, which stores it within :data:`BATCH_SECONDS` (plus the
    write) and keeps the newest ``keep`` records; :meth:`query`, :meth:`get`
    and :meth:`job_result` read in ``reactor``'s thread pool, each pool
    thread on a connection of its own.

    A batch the database cannot take for now (:class:`HistoryUnavailable`)
    is kept and tried again, after :data:`RETRY_FIRST` seconds, doubling up
    to :data:`RETRY_MOST`, with the records added meanwhile waiting behind
    it; at most ``hold`` records are held (the batch being tried included),
    beyond them the oldest of those waiting behind it are dropped.
    A batch the database refuses for good (a record without id, any other
    error) is logged and dropped. Records dropped either way are counted
    in :attr:`dropped`.

    As the server's service it owns ``store``: :meth:`startService` starts
    the thread, :meth:`stopService` stops it and then closes ``store``.
    Used on its own, :meth:`start` and :meth:`stop` leave ``store`` open.

    :param store: the database.
    :param keep: how many records to keep (``--history-keep``).
    :param reactor: whose thread pool reads, and (if it keeps time) whose
        clock bounds a stop whose last write does not return.
    :param hold: the most records kept waiting.
    :param retry: the first and the longest wait before a failed write is
        tried again, in seconds.
    :param stop_wait: how long a stop goes on trying to write what waits.
    """

    name = "history"

    def __init__(
        self,
        store: Store,
        keep: int,
        reactor: IReactorThreads,
        *,
        hold: int = HOLD_RECORDS,
        retry: tuple[float, float] = (RETRY_FIRST, RETRY_MOST),
        stop_wait: float = STOP_WAIT,
    ) -> None:
        if keep < 0:
            raise ValueError(f"keep must be 0 or more: {keep}")
        if hold < 1:
            raise ValueError(f"hold must be 1 or more: {hold}")
        self._store, self._keep, self._reactor = store, keep, reactor
        self._hold, self._retry, self._stop_wait = hold, retry, stop_wait
        # What waits to be written, oldest first, and the batch being
        # written (not in _pending), under _ready's lock: add() appends from
        # the reactor's thread, the writer thread takes and gives back.
        self._pending: deque[_Item] = deque()
        self._pending_bytes = 0
        self._writing = 0
        self._since = 0.0  # when _pending became non-empty (monotonic)
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._give_up_at: float | None = None  # once stopping (monotonic)
        self._finished = False
        self._thread_done = False
        self._overdue_call: IDelayedCall | None = None
        self._told_stopped = False
        self._told_full = False
        self._waiting: list[Deferred[None]] = []
        #: Records that were never stored: dropped while the database was out
        #: of reach, refused batches, those still waiting when a stop gave up,
        #: and those added after :meth:`stop`.
        self.dropped = 0
        #: Whether the database could be reached at the last try: ``False``
        #: from a write or read that found it out of reach until a write
        #: succeeds again (``/health``).
        self.available = True

    def start(self) -> None:
        """Start the writer thread (once)."""
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(target=self._run, name="kapow-history-writer", daemon=True)
            self._thread.start()

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> Deferred[None]:
        """Stop (:meth:`stop`), then close the store: nothing reads it after the server."""
        super().stopService()
        stopped = self.stop()
        stopped.addCallback(lambda _: self._close())
        return stopped

    def _close(self) -> None:
        # A writer thread still inside a write keeps its connection: the
        # process is ending, and closing it under the thread is no help.
        if self._thread is None or self._thread_done:
            self._store.close()

    def add(self, record: RunRecord, result: JobResult | None = None) -> None:
        """
        Store ``record`` (and its job's ``result``) soon; never blocks. Once
        :meth:`stop` is called the record is dropped instead.
        """
        if self._stopping:
            if not self._told_stopped:
                self._told_stopped = True
                log.warn(
                    "the run history is stopped: run record {id} and any after it are not stored",
                    id=record.get("id"),
                )
            with self._ready:
                self.dropped += 1
            return
        with self._ready:
            if not self._pending:
                self._since = time.monotonic()
            self._pending.append((record, result))
            size = _body_size(result)
            self._pending_bytes += size
            dropped = self._make_room()
            # Wake the writer only when that changes what it does: work
            # where there was none, or a batch that is now full.
            if (
                len(self._pending) == 1
                or len(self._pending) == BATCH_RECORDS
                or self._pending_bytes - size < BATCH_BYTES <= self._pending_bytes
            ):
                self._ready.notify()
        if dropped and not self._told_full:
            self._told_full = True
            log.warn(
                "run history: {hold} run records wait for the database: the oldest are dropped",
                hold=self._hold,
            )

    def stop(self) -> Deferred[None]:
        """
        Write what waits, end the writer thread and close its connection.
        If the database cannot be reached, trying goes on for ``stop_wait``
        seconds; what still waits then is lost (logged, and counted in
        :attr:`dropped`).

        :return: fires once all that is done.
        """
        if not self._stopping:
            self._stopping = True
            if self._thread is None:
                self._finished = True
                self._abandon()
            else:
                with self._ready:
                    self._give_up_at = time.monotonic() + self._stop_wait
                    self._ready.notify()
                clock = IReactorTime(self._reactor, None)
                if clock is not None:
                    self._overdue_call = clock.callLater(self._stop_wait + _STOP_GRACE, self._overdue)
        if self._finished:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._waiting.append(waiting)
        return waiting

    def query(self, q: HistoryQuery) -> Deferred[list[RunRecord]]:
        """The records ``q`` matches, newest first (see :meth:`Store.query`).

        Fails with :class:`HistoryUnavailable` if the database cannot be reached."""
        return self._read(
            deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._store.query, q)
        )

    def get(self, run_id: str) -> Deferred[RunRecord | None]:
        """The record of run ``run_id``, or ``None``.

        Fails with :class:`HistoryUnavailable` if the database cannot be reached."""
        return self._read(
            deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._store.get, run_id)
        )

    def job_result(self, run_id: str) -> Deferred[JobResult | None]:
        """The kept result of job ``run_id``, or ``None``.

        Fails with :class:`HistoryUnavailable` if the database cannot be reached."""
        return self._read(
            deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._store.job_result, run_id)
        )

    def _read(self, reading: Deferred[R]) -> Deferred[R]:
        def failed(failure: Failure) -> Failure:
            if failure.check(HistoryUnavailable):
                self.available = False
                with self._ready:  # the writer tries a write: the way back to available
                    self._ready.notify()
            return failure

        return reading.addErrback(failed)

    # The writer thread.

    def _run(self) -> None:
        wait = 0.0  # before the next try, after a failure
        try:
            while (batch := self._next_batch(wait)) is not None:
                first, most = self._retry
                wait = 0.0 if self._write(batch) else min(max(wait * 2, first), most)
        finally:
            self._store.disconnect()
            self._thread_done = True
            self._reactor.callFromThread(self._stopped)

    def _next_batch(self, wait: float) -> list[_Item] | None:
        """
        The next batch to write, taken out of :attr:`_pending` (empty: a try
        of a database out of reach with nothing waiting); ``None`` once the
        thread is done (stopped with nothing left, or given up).
        """
        with self._ready:
            after = time.monotonic() + wait
            while True:
                now = time.monotonic()
                if self._give_up_at is not None and (not self._pending or now >= self._give_up_at):
                    self._give_up()
                    return None
                if now >= after and self._pending:
                    due = self._since + BATCH_SECONDS
                    if (
                        self._stopping
                        or now >= due
                        or len(self._pending) >= BATCH_RECORDS
                        or self._pending_bytes >= BATCH_BYTES
                    ):
                        return self._take()
                    self._ready.wait(due - now)
                elif now >= after and not self.available:
                    return []  # nothing waits: see whether it is back
                elif wait:
                    end = after if self._give_up_at is None else min(after, self._give_up_at)
                    self._ready.wait(max(end - now, 0.0))
                else:
                    self._ready.wait()

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        while self._pending and len(batch) < BATCH_RECORDS and size < BATCH_BYTES:
            item = self._pending.popleft()
            batch.append(item)
            size += _body_size(item[1])
        self._pending_bytes -= size
        self._writing = len(batch)
        return batch

    def _write(self, batch: list[_Item]) -> bool:
        """Write ``batch``; ``False`` if it must be tried again (it is back in :attr:`_pending`)."""
        records = [record for record, _ in batch]
        results = {record["id"]: result for record, result in batch if result is not None}
        try:
            self._store.write(records, results, self._keep)
        except HistoryUnavailable as error:
            with self._ready:
                self._pending.extendleft(reversed(batch))
                self._pending_bytes += sum(_body_size(result) for _, result in batch)
                self._writing = 0
                dropped = self._make_room()
            if self.available:
                self.available = False
                self._reactor.callFromThread(
                    log.warn,
                    "run history: {reason}; run records wait in memory (at most {hold}) and are tried again",
                    reason=str(error),
                    hold=self._hold,
                )
            if dropped and not self._told_full:
                self._told_full = True
                self._reactor.callFromThread(
                    log.warn,
                    "run history: {hold} run records wait for the database: the oldest are dropped",
                    hold=self._hold,
                )
            return False
        except Exception:
            with self._ready:
                self._writing = 0
                self.dropped += len(batch)
            # The log's observers belong to the reactor's thread.
            self._reactor.callFromThread(
                log.failure, "run history: {count} run records not stored", Failure(), count=len(batch)
            )
            return True
        with self._ready:
            self._writing = 0
        if not self.available:
            self.available = True
            self._told_full = False
            self._reactor.callFromThread(log.info, "run history: the database is reachable again")
        return True

    def _make_room(self) -> int:
        """Drop the oldest waiting records while more than ``hold`` are held, the
        batch being written included (under :attr:`_ready`'s lock); how many."""
        excess = min(len(self._pending) + self._writing - self._hold, len(self._pending))
        for _ in range(excess):
            _, result = self._pending.popleft()
            self._pending_bytes -= _body_size(result)
        if excess > 0:
            self.dropped += excess
            return excess
        return 0

    def _give_up(self) -> None:
        """Count what still waits as lost (under :attr:`_ready`'s lock)."""
        lost = len(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        if lost:
            self.dropped += lost
            self._reactor.callFromThread(
                log.error,
                "run history: {count} run records lost: the database could not be reached within {wait} s",
                count=lost,
                wait=self._stop_wait,
            )

    def _abandon(self) -> None:
        """Count what was added to a writer stopped before it started."""
        with self._ready:
            self.dropped += len(self._pending)
            self._pending.clear()
            self._pending_bytes = 0

    def _stopped(self) -> None:
        if self._overdue_call is not None and self._overdue_call.active():
            self._overdue_call.cancel()
        self._finished = True
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.callback(None)

    def _overdue(self) -> None:
        if self._finished:
            return
        log.error("run history: the writer thread is still inside a write; stopping without it")
        self._stopped()


def _body_size(result: JobResult | None) -> int:
    return 0 if result is None else len(result.body)
