# -*- test-case-name: tests.unit.test_history_store -*-
"""
The run history's database (SPEC.md §12): run records and jobs' kept results
in SQLite, plain synchronous calls, no Twisted.

One :class:`HistoryStore` (a :class:`kapow.history.base.Store`) serves
several threads: each thread that calls it gets a connection of its own,
made on its first call and kept until :meth:`HistoryStore.disconnect` (from
that thread) or :meth:`HistoryStore.close`. The server writes from one thread
(:class:`kapow.history.writer.HistoryWriter`'s) and reads from the reactor's
thread pool; in a file database (WAL) readers and the writer never wait for
one another.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from kapow.core.runs import HistoryQuery, JobResult, RunRecord, parse_time
from kapow.history.base import HistoryError, HistoryUnavailable, ThreadConnections, one_line, yielding

__all__ = ["SCHEMA_VERSION", "HistoryError", "HistoryStore", "HistoryUnavailable"]

#: The ``PRAGMA user_version`` of the schema below. A database of a newer
#: version is refused; an older one (none yet) would be upgraded at open.
SCHEMA_VERSION = 1

# ``seq`` (the rowid) grows with every new id, so the oldest records are the
# lowest keys and retention deletes a key range. ``result_body`` comes last:
# a large body spills to overflow pages, and a column stored after it could
# only be reached by walking them.
_SCHEMA = (
    """
    CREATE TABLE runs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        route_id TEXT,
        outcome TEXT,
        started REAL NOT NULL,
        record TEXT NOT NULL,
        result_status INTEGER,
        result_reason TEXT,
        result_headers TEXT,
        truncated INTEGER,
        result_body BLOB
    )
    """,
    # One index per filter combination of GET /history, each ending in
    # ``started`` (and, implicitly, ``seq``) so that the newest matching rows
    # come first from the index itself and LIMIT stops the walk early.
    "CREATE INDEX runs_by_started ON runs (started)",
    "CREATE INDEX runs_by_route ON runs (route_id, started)",
    "CREATE INDEX runs_by_outcome ON runs (outcome, started)",
    "CREATE INDEX runs_by_route_outcome ON runs (route_id, outcome, started)",
)

_COLUMNS = (
    "id",
    "route_id",
    "outcome",
    "started",
    "record",
    "result_status",
    "result_reason",
    "result_headers",
    "truncated",
    "result_body",
)

# A record already stored keeps its ``seq`` and takes every other column from
# the new row (a job's record replaced when it ends), so keys stay dense and
# ``max(seq) - keep`` is exactly where retention cuts.
_UPSERT = (
    f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
    f" ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _COLUMNS[1:])}"
)

#: How long a connection waits for another's lock before it fails, in seconds.
BUSY_TIMEOUT = 5.0
#: The most a file database's write-ahead log keeps of its size between
#: checkpoints: a large batch grows it, the next checkpoint cuts it back.
WAL_SIZE_LIMIT = 16 * 1024 * 1024


def _row(record: RunRecord, results: Mapping[str, JobResult]) -> tuple[Any, ...]:
    """The columns of ``record`` (and its job's result, if ``results`` has one) in :data:`_COLUMNS` order."""
    run_id, started_text = record.get("id"), record.get("started")
    if not isinstance(run_id, str) or not isinstance(started_text, str):
        raise ValueError(f"a run record needs a text id and started: {run_id!r}, {started_text!r}")
    started = parse_time(started_text)
    # ASCII JSON: text the server took from the wire (surrogate escapes
    # included) cannot fail to encode on its way into SQLite.
    text = json.dumps(record, separators=(",", ":"))
    result = results.get(run_id)
    if result is None:
        return (run_id, record.get("route_id"), record.get("outcome"), started, text, *(None,) * 5)
    # Latin-1 maps every byte to one character: any header survives as text.
    headers = json.dumps(
        [[name.decode("latin-1"), value.decode("latin-1")] for name, value in result.headers]
    )
    return (
        run_id,
        record.get("route_id"),
        record.get("outcome"),
        started,
        text,
        result.status,
        result.reason,
        headers,
        int(result.truncated),
        result.body,
    )


def _where(q: HistoryQuery) -> tuple[str, list[Any]]:
    terms: list[str] = []
    args: list[Any] = []
    if q.route_id is not None:
        terms.append("route_id = ?")
        args.append(q.route_id)
    if q.outcome is not None:
        terms.append("outcome = ?")
        args.append(q.outcome)
    if q.since is not None:
        terms.append("started >= ?")
        args.append(q.since)
    return (" WHERE " + " AND ".join(terms) if terms else ""), args


def query_sql(q: HistoryQuery) -> tuple[str, list[Any]]:
    """The statement that answers ``q``, and its parameters: newest first by
    ``started``, ties in the order stored."""
    where, args = _where(q)
    return f"SELECT record FROM runs{where} ORDER BY started DESC, seq DESC LIMIT ?", [*args, q.limit]


class HistoryStore:
    """
    The run history in one SQLite database, a file or in memory. Make one
    with :meth:`open`.

    Every method may be called from any thread; each thread uses a
    connection of its own (see the module's docstring).
    """

    def __init__(self, target: str, uri: bool, anchor: sqlite3.Connection, file: bool) -> None:
        # The first connection stays open until close(): an in-memory
        # database lives as long as one connection to it does.
        self._anchor = anchor
        self._connections = ThreadConnections(lambda: _connect(target, uri, file))

    @classmethod
    def open(cls, path: str | None) -> HistoryStore:
        """
        The history in the SQLite file ``path`` (made if absent, with its
        schema), or in a database in this process's memory if ``None``.

        :raises HistoryError: if the database cannot be opened or written,
            is not a history database, or is of a newer schema than this
            code knows.
        """
        if path is None:
            # The memdb VFS shares the database between this process's
            # connections with ordinary locks, which wait (busy timeout).
            # A shared-cache ``mode=memory`` database instead answers a
            # reader "database table is locked" at once while a write is
            # in progress.
            target, uri, shown = f"file:/kapow-history-{secrets.token_hex(8)}?vfs=memdb", True, "in memory"
        else:
            target, uri, shown = path, False, path
        anchor = None
        try:
            anchor = _connect(target, uri, file=path is not None)
            _prepare(anchor, file=path is not None)
        except (sqlite3.Error, HistoryError) as error:
            if anchor is not None:
                anchor.close()
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise HistoryError(f"cannot open the history database {shown}: {reason}") from None
        return cls(target, uri, anchor, file=path is not None)

    @contextmanager
    def _using(self, doing: str) -> Iterator[sqlite3.Connection]:
        """This thread's connection, with SQLite's errors told as the store's: a
        database locked past the busy timeout, a full disk or a file that cannot
        be opened now is unavailable; anything else refuses the call."""
        try:
            yield self._connection()
        except sqlite3.OperationalError as error:
            raise HistoryUnavailable(f"cannot {doing} the history database: {one_line(error)}") from None
        except sqlite3.Error as error:
            raise HistoryError(f"cannot {doing} the history database: {one_line(error)}") from None

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, made on its first call."""
        return self._connections.current() or self._connections.make()

    def write(self, records: Sequence[RunRecord], results: Mapping[str, JobResult] | None, keep: int) -> None:
        """
        Store ``records`` in one transaction, each with its job's result if
        ``results`` has one under its id; a record whose id is stored already
        replaces it (and its result). Then drop the oldest records beyond the
        newest ``keep``.

        :raises ValueError: if a record has no text ``id`` or no RFC 3339
            ``started`` (nothing is written).
        :raises HistoryUnavailable: if the database cannot be written for
            now (locked past the busy timeout, disk full); nothing is written.
        :raises HistoryError: if SQLite refuses the write otherwise.
        """
        if keep < 0:
            raise ValueError(f"keep must be 0 or more: {keep}")
        rows = [_row(record, results or {}) for record in yielding(records)]
        with self._using("write") as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(_UPSERT, rows)
                (newest,) = connection.execute("SELECT max(seq) FROM runs").fetchone()
                if newest is not None and newest > keep:
                    connection.execute("DELETE FROM runs WHERE seq <= ?", (newest - keep,))
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    def query(self, q: HistoryQuery) -> list[RunRecord]:
        """The records ``q`` matches, newest first (by ``started``), at most ``q.limit``."""
        sql, args = query_sql(q)
        with self._using("read") as connection:
            texts = connection.execute(sql, args).fetchall()
        return [json.loads(text) for (text,) in texts]

    def get(self, run_id: str) -> RunRecord | None:
        """The record of run ``run_id``, or ``None`` if none is stored."""
        with self._using("read") as connection:
            row = connection.execute("SELECT record FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def job_result(self, run_id: str) -> JobResult | None:
        """The kept result of job ``run_id``, or ``None`` if no result is stored for it."""
        with self._using("read") as connection:
            row = connection.execute(
                "SELECT result_status, result_reason, result_headers, truncated, result_body"
                " FROM runs WHERE id = ? AND result_status IS NOT NULL",
                (run_id,),
            ).fetchone()
        if row is None:
            return None
        status, reason, headers, truncated, body = row
        return JobResult(
            status=status,
            reason=reason or "",
            headers=[
                (name.encode("latin-1"), value.encode("latin-1")) for name, value in json.loads(headers)
            ],
            body=bytes(body or b""),
            truncated=bool(truncated),
        )

    def count(self) -> int:
        """How many records are stored."""
        with self._using("read") as connection:
            (number,) = connection.execute("SELECT count(*) FROM runs").fetchone()
        return int(number)

    def disconnect(self) -> None:
        """Close this thread's connection, if it has one (a thread that is done with the store)."""
        self._connections.forget_current()

    def close(self) -> None:
        """
        Close every connection, each thread's included: call it once no
        thread uses the store any more. An in-memory history is gone after.
        Closing twice does nothing.
        """
        if self._connections.close_all():
            self._anchor.close()


def _connect(target: str, uri: bool, file: bool) -> sqlite3.Connection:
    # Transactions are explicit (BEGIN IMMEDIATE in write); any thread may
    # close a connection, which close() needs.
    connection = sqlite3.connect(
        target, uri=uri, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
    )
    if file:
        # In WAL mode NORMAL syncs at checkpoints, not at every commit: a
        # power cut may lose the last batches, never the file's consistency.
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    return connection


def _prepare(connection: sqlite3.Connection, file: bool) -> None:
    """Check that the database is a history of a schema this code knows,
    making the schema in an empty one; and that it can be written."""
    if file:
        (mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            raise HistoryError(f"cannot use write-ahead logging (journal mode {mode})")
    # A write lock at once: a database that cannot be written fails here,
    # at start, rather than at the first batch.
    connection.execute("BEGIN IMMEDIATE")
    try:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"its schema version {version} is newer than this kapow knows ({SCHEMA_VERSION})"
            )
        if version == 0:
            tables = connection.execute("SELECT name FROM sqlite_schema WHERE type = 'table'").fetchall()
            if tables:
                raise HistoryError("it holds tables but is not a kapow history")
            for statement in _SCHEMA:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
