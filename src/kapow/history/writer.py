# -*- test-case-name: tests.unit.test_history_store -*-
"""
The run history from the reactor's side (SPEC.md §12): records handed over
without blocking, written in batches by one thread of their own, and reads
answered as Deferreds from the reactor's thread pool.
"""

from __future__ import annotations

import queue
import threading
import time

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from kapow.core.runs import HistoryQuery, JobResult, RunRecord
from kapow.history.store import HistoryStore

__all__ = ["BATCH_BYTES", "BATCH_RECORDS", "BATCH_SECONDS", "HistoryWriter"]

log = Logger()

#: A batch is written once it holds this many records, ...
BATCH_RECORDS = 1_000
#: ... or this many bytes of jobs' result bodies, ...
BATCH_BYTES = 16 * 1024 * 1024
#: ... or this long after its first record was handed over, whichever comes first.
BATCH_SECONDS = 0.2

#: A record and its job's result, as queued; ``None`` in the queue asks the thread to stop.
_Item = tuple[RunRecord, JobResult | None]


class HistoryWriter(Service):
    """
    Feeds ``store`` from the reactor: :meth:`add` queues a record for the
    writer thread, which stores it within :data:`BATCH_SECONDS` (plus the
    write) and keeps the newest ``keep`` records; :meth:`query`, :meth:`get`
    and :meth:`job_result` read in ``reactor``'s thread pool, each pool
    thread on a connection of its own.

    A batch the database refuses (disk full, locked) is logged and dropped,
    and its records counted in :attr:`dropped`; the writer goes on with the
    next one.

    As the server's service it owns ``store``: :meth:`startService` starts
    the thread, :meth:`stopService` stops it and then closes ``store``.
    Used on its own, :meth:`start` and :meth:`stop` leave ``store`` open.

    :param store: the database.
    :param keep: how many records to keep (``--history-keep``).
    """

    name = "history"

    def __init__(self, store: HistoryStore, keep: int, reactor: IReactorThreads) -> None:
        if keep < 0:
            raise ValueError(f"keep must be 0 or more: {keep}")
        self._store, self._keep, self._reactor = store, keep, reactor
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._finished = False
        self._told_stopped = False
        self._waiting: list[Deferred[None]] = []
        self._lock = threading.Lock()
        #: Records that were never stored: refused batches, and those added after :meth:`stop`.
        self.dropped = 0

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
        stopped.addCallback(lambda _: self._store.close())
        return stopped

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
            self._count_dropped(1)
            return
        self._queue.put((record, result))

    def stop(self) -> Deferred[None]:
        """
        Write what is queued, end the writer thread and close its connection.

        :return: fires once all that is done.
        """
        if not self._stopping:
            self._stopping = True
            if self._thread is None:
                self._finished = True
                self._abandon_queue()
            else:
                self._queue.put(None)
        if self._finished:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._waiting.append(waiting)
        return waiting

    def query(self, q: HistoryQuery) -> Deferred[list[RunRecord]]:
        """The records ``q`` matches, newest first (see :meth:`HistoryStore.query`)."""
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._store.query, q)

    def get(self, run_id: str) -> Deferred[RunRecord | None]:
        """The record of run ``run_id``, or ``None``."""
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._store.get, run_id)

    def job_result(self, run_id: str) -> Deferred[JobResult | None]:
        """The kept result of job ``run_id``, or ``None``."""
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._store.job_result, run_id)

    # The writer thread.

    def _run(self) -> None:
        try:
            while self._write_batch():
                pass
        finally:
            self._store.disconnect()
            self._reactor.callFromThread(self._stopped)

    def _write_batch(self) -> bool:
        """Wait for a record, gather a batch and write it; ``False`` once stopped."""
        first = self._queue.get()
        if first is None:
            return False
        batch, size, going = [first], _body_size(first), True
        deadline = time.monotonic() + BATCH_SECONDS
        while len(batch) < BATCH_RECORDS and size < BATCH_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                going = False
                break
            batch.append(item)
            size += _body_size(item)
        self._write(batch)
        return going

    def _write(self, batch: list[_Item]) -> None:
        records = [record for record, _ in batch]
        results = {record["id"]: result for record, result in batch if result is not None}
        try:
            self._store.write(records, results, self._keep)
        except Exception:
            self._count_dropped(len(batch))
            # The log's observers belong to the reactor's thread.
            self._reactor.callFromThread(
                log.failure, "run history: {count} run records not stored", Failure(), count=len(batch)
            )

    def _count_dropped(self, count: int) -> None:
        with self._lock:
            self.dropped += count

    def _abandon_queue(self) -> None:
        """Count what was added to a writer stopped before it started."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
            self._count_dropped(1)

    def _stopped(self) -> None:
        self._finished = True
        waiting, self._waiting = self._waiting, []
        for each in waiting:
            each.callback(None)


def _body_size(item: _Item | None) -> int:
    return 0 if item is None or item[1] is None else len(item[1].body)
