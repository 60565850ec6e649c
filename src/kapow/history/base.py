# -*- test-case-name: tests.unit.test_history_store -*-
"""
What every database of the run history offers (SPEC.md §12): :class:`Store`,
which the SQLite store (:mod:`kapow.history.store`) and the PostgreSQL one
(:mod:`kapow.history.postgres`) both satisfy and the writer
(:mod:`kapow.history.writer`) is typed against, and the errors they raise.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Generic, Protocol, TypeVar

from kapow.core.runs import HistoryQuery, JobResult, RunRecord

__all__ = ["HistoryError", "HistoryUnavailable", "Store", "is_postgres_uri", "one_line", "shown_uri"]


class HistoryError(Exception):
    """The history's database cannot be used; ``str()`` says why, in one line."""


class HistoryUnavailable(HistoryError):
    """
    The history's database cannot be reached or written for now (a database
    server stopped or restarting, a connection lost, a file locked or a
    full disk): the same call may succeed later. ``str()`` says why, in one
    line.
    """


class Store(Protocol):
    """
    The run history's database: plain synchronous calls, which any thread
    may make, each thread on a connection of its own (made at its first
    call, and made again after one is lost). A record is kept as it is
    given, fields beyond :data:`kapow.core.runs.FIELDS` included (``server``,
    ``_guard``), and read back the same.
    """

    def write(self, records: Sequence[RunRecord], results: Mapping[str, JobResult] | None, keep: int) -> None:
        """
        Store ``records`` in one transaction, each with its job's result if
        ``results`` has one under its id; a record whose id is stored already
        replaces it (and its result), so writing a batch again does no harm.
        Then drop the oldest records beyond the newest ``keep`` (of the whole
        database).

        :raises ValueError: if a record has no text ``id`` or no RFC 3339
            ``started``, or ``keep`` is negative (nothing is written).
        :raises HistoryUnavailable: if the database cannot be reached or
            written for now (nothing is written; the same batch may be
            written again later).
        :raises HistoryError: if the database refuses the batch for good.
        """

    def query(self, q: HistoryQuery) -> list[RunRecord]:
        """
        The records ``q`` matches, newest first (by ``started``, ties the
        newest stored first), at most ``q.limit``.

        :raises HistoryUnavailable: if the database cannot be reached.
        """

    def get(self, run_id: str) -> RunRecord | None:
        """
        The record of run ``run_id``, or ``None`` if none is stored.

        :raises HistoryUnavailable: if the database cannot be reached.
        """

    def job_result(self, run_id: str) -> JobResult | None:
        """
        The kept result of job ``run_id``, or ``None`` if no result is stored for it.

        :raises HistoryUnavailable: if the database cannot be reached.
        """

    def count(self) -> int:
        """How many records are stored."""

    def disconnect(self) -> None:
        """Close this thread's connection, if it has one (a thread that is done with the store)."""

    def close(self) -> None:
        """
        Close every connection, each thread's included: call it once no
        thread uses the store any more. Closing twice does nothing; any
        other call after raises :class:`HistoryError`.
        """


T = TypeVar("T")

#: Records a writing thread prepares between two chances it gives the reactor
#: to take the interpreter lock (about a fifth of a millisecond of work).
YIELD_EVERY = 16


def yielding(items: Iterable[T], every: int = YIELD_EVERY) -> Iterator[T]:
    """
    ``items``, letting go of the interpreter lock after every ``every`` of
    them. A thread that prepares a batch of thousands of records in Python
    would otherwise hold the lock for milliseconds at a time, and the
    reactor's thread, which waits up to the interpreter's switch interval
    (5 ms) before it asks for it back, would answer every request late meanwhile.
    """
    for n, item in enumerate(items, 1):
        yield item
        if n % every == 0:
            time.sleep(0)  # lets go of the lock: a waiting thread takes it


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


class ThreadConnections(Generic[C]):
    """
    A store's connections to its database, one per thread that uses it
    (neither SQLite's nor psycopg's may serve two threads at once): made by
    ``connect`` when a thread first needs one, and all closed together by
    :meth:`close_all`, from any thread.
    """

    def __init__(self, connect: Callable[[], C]) -> None:
        self._connect = connect
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: set[C] = set()
        #: whether :meth:`close_all` was called
        self.closed = False

    def current(self) -> C | None:
        """This thread's connection, if it has one."""
        connection: C | None = getattr(self._local, "connection", None)
        return connection

    def make(self) -> C:
        """
        A new connection for this thread, kept as its own.

        :raises HistoryError: once :meth:`close_all` was called.
        :raises Exception: what ``connect`` raises.
        """
        if self.closed:
            raise HistoryError("the history database is closed")
        connection = self._connect()
        with self._lock:
            closed = self.closed
            if not closed:
                self._all.add(connection)
        if closed:  # closed while it connected
            connection.close()
            raise HistoryError("the history database is closed")
        self._local.connection = connection
        return connection

    def forget_current(self) -> None:
        """Close this thread's connection, if it has one."""
        connection = self.current()
        if connection is not None:
            self.forget(connection)

    def forget(self, connection: C) -> None:
        """Close ``connection``; if it was this thread's, the next call makes another."""
        if self.current() is connection:
            del self._local.connection
        with self._lock:
            self._all.discard(connection)
        connection.close()

    def close_all(self) -> bool:
        """Close every thread's connection; ``False`` if that was done before."""
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            connections, self._all = self._all, set()
        for connection in connections:
            connection.close()
        return True


def one_line(error: BaseException) -> str:
    """``error``'s message in one line (a database driver's may take several)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # A heading such as "Multiple connection attempts failed. All failures
    # were:" says nothing without what follows it.
    return " ".join(lines) if lines[0].endswith(":") else lines[0]


def is_postgres_uri(location: str) -> bool:
    """Whether ``--history``'s ``location`` names a PostgreSQL database rather than a file."""
    return location.startswith(("postgresql://", "postgres://"))


def shown_uri(uri: str) -> str:
    """``uri`` fit to be shown and logged: any password in it replaced by ``***``."""
    shown = re.sub(r"^([a-z]+://[^:@/?#]*):[^@/?#]*@", r"\1:***@", uri)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", shown)
