# -*- test-case-name: tests.unit.test_history_store -*-
"""
The run history in PostgreSQL (SPEC.md §12 "Shared by a cluster"): the same
calls as the SQLite store (a :class:`kapow.history.base.Store`), on a
database that several servers share.

- The schema is versioned (table ``kapow_schema``) and made at
  :meth:`PostgresStore.open` if absent, under a transaction-level advisory
  lock, so that servers starting at once do not race; an older version is
  upgraded there, a newer one refused.
- Writers serialize on another advisory lock for the length of a batch's
  transaction: ids are numbered (``seq``) in the order batches commit, with
  no gaps but those of failed transactions, and retention (the newest
  ``keep`` of the whole database, by ``seq``) is one index range delete
  that sees every batch committed before it.
- A record is kept as JSON text, whole (fields beyond the run record's
  included); ``id``, ``server``, ``route_id``, ``outcome`` and ``started``
  are copied into columns to be found by.
- Each thread has a connection of its own (autocommit; a write is one
  explicit transaction). A connection that breaks is closed and made again
  at the thread's next call; a call that finds its thread's connection
  broken by a server restart retries once on a new one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from kapow.core.runs import HistoryQuery, JobResult, RunRecord, parse_time
from kapow.history.base import (
    HistoryError,
    HistoryUnavailable,
    ThreadConnections,
    one_line,
    shown_uri,
    yielding,
)

__all__ = ["CONNECT_TIMEOUT", "SCHEMA_VERSION", "PostgresStore", "query_sql"]

T = TypeVar("T")

#: The version in ``kapow_schema`` of the schema below.
SCHEMA_VERSION = 1

#: Seconds to wait for a connection (unless the URI sets ``connect_timeout``).
CONNECT_TIMEOUT = 3

#: What a connection sets unless the URI does: who it is in
#: ``pg_stat_activity``, and a peer that stops answering noticed within
#: seconds (TCP keepalives; unacknowledged data given up after 10 s), so
#: that no call waits on a dead connection for the kernel's two hours.
_CONNECTION_DEFAULTS: dict[str, Any] = {
    "application_name": "kapow",
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}

#: A write waits at most this long for another server's batch (the write
#: lock) and takes at most ``_WRITE_TIMEOUT`` in all; past either it fails
#: as unavailable and is tried again.
_LOCK_TIMEOUT, _WRITE_TIMEOUT = "10s", "60s"

# Advisory lock keys ("kapow" and a number): the schema's making, and writes.
_SCHEMA_LOCK = 0x6B61706F77000001
_WRITE_LOCK = 0x6B61706F77000002

_SCHEMA = (
    "CREATE TABLE kapow_schema (version integer NOT NULL)",
    # ``seq`` grows with every new id (writes are serialized), so the oldest
    # records have the lowest keys and retention deletes a key range.
    # ``started`` is seconds since the epoch, as HistoryQuery.since is.
    """
    CREATE TABLE kapow_runs (
        seq bigserial PRIMARY KEY,
        id text NOT NULL UNIQUE,
        server text,
        route_id text,
        outcome text,
        started double precision NOT NULL,
        record text NOT NULL,
        result_status integer,
        result_reason text,
        result_headers text,
        truncated boolean,
        result_body bytea
    )
    """,
    # One index per filter combination of GET /history, each ending in
    # (started, seq): the newest matching rows come first from a backward
    # walk of the index itself, and LIMIT stops it early.
    "CREATE INDEX kapow_runs_by_started ON kapow_runs (started, seq)",
    "CREATE INDEX kapow_runs_by_route ON kapow_runs (route_id, started, seq)",
    "CREATE INDEX kapow_runs_by_outcome ON kapow_runs (outcome, started, seq)",
    "CREATE INDEX kapow_runs_by_route_outcome ON kapow_runs (route_id, outcome, started, seq)",
)

#: The statements that take the schema from version N to N + 1, by N.
_UPGRADES: dict[int, tuple[str, ...]] = {}

#: The columns a write sets, with each one's array type for ``unnest``.
_COLUMNS = (
    ("id", "text"),
    ("server", "text"),
    ("route_id", "text"),
    ("outcome", "text"),
    ("started", "double precision"),
    ("record", "text"),
    ("result_status", "integer"),
    ("result_reason", "text"),
    ("result_headers", "text"),
    ("truncated", "boolean"),
    ("result_body", "bytea"),
)
_NAMES = ", ".join(name for name, _ in _COLUMNS)
_SET = ", ".join(f"{name} = new.{name}" for name, _ in _COLUMNS[1:])

# The batch as arrays, one per column (one statement whatever the batch's
# size): the ids stored already are updated in place, keeping their ``seq``
# (a job's record replaced when it ends, a batch written again after a lost
# connection), and only the others are inserted, in the batch's order, so
# that no sequence number is spent on an update. ON CONFLICT is the
# safeguard of a writer that does not take the write lock.
_UPSERT = f"""
WITH new AS (
    SELECT * FROM unnest({", ".join(f"%b::{kind}[]" for _, kind in _COLUMNS)})
        WITH ORDINALITY AS batch ({_NAMES}, position)
), updated AS (
    UPDATE kapow_runs SET {_SET} FROM new WHERE kapow_runs.id = new.id RETURNING kapow_runs.id
)
INSERT INTO kapow_runs ({_NAMES})
SELECT {_NAMES} FROM new WHERE new.id NOT IN (SELECT id FROM updated) ORDER BY position
ON CONFLICT (id) DO UPDATE SET {_SET.replace("new.", "excluded.")}
"""

# The write's limits for its transaction, then the write lock: one round trip.
_LOCK = (
    "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true),"
    " pg_advisory_xact_lock(%s)"
)

_RETAIN = "DELETE FROM kapow_runs WHERE seq <= (SELECT max(seq) FROM kapow_runs) - %s"


def _text(value: object) -> str | None:
    """A record's field as a column's text: PostgreSQL's text holds no NUL
    and no lone surrogate, so such a value is kept as its JSON string
    (queries and lookups ask for the same)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    if "\x00" in text or (not text.isascii() and not _encodable(text)):
        return json.dumps(text)
    return text


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _columns(records: Sequence[RunRecord], results: Mapping[str, JobResult]) -> list[list[Any]]:
    """The batch as one list per column of :data:`_COLUMNS`, a record written
    twice in it once (the last one given, at the place of the first)."""
    rows: dict[str, tuple[Any, ...]] = {}
    for record in yielding(records):
        run_id, started_text = record.get("id"), record.get("started")
        if not isinstance(run_id, str) or not isinstance(started_text, str):
            raise ValueError(f"a run record needs a text id and started: {run_id!r}, {started_text!r}")
        started = parse_time(started_text)
        # ASCII JSON: text the server took from the wire (NULs and surrogate
        # escapes included) cannot fail on its way into a text column.
        text = json.dumps(record, separators=(",", ":"))
        key = _text(run_id)
        assert key is not None
        result = results.get(run_id)
        plain = (
            key,
            _text(record.get("server")),
            _text(record.get("route_id")),
            _text(record.get("outcome")),
        )
        if result is None:
            rows[key] = (*plain, started, text, None, None, None, None, None)
            continue
        # Latin-1 maps every byte to one character: any header survives as text.
        headers = json.dumps(
            [[name.decode("latin-1"), value.decode("latin-1")] for name, value in result.headers]
        )
        reason = json.dumps(result.reason)  # a reason with a NUL in it survives too
        rows[key] = (*plain, started, text, result.status, reason, headers, result.truncated, result.body)
    return [list(column) for column in zip(*rows.values(), strict=True)] or [[] for _ in _COLUMNS]


def query_sql(q: HistoryQuery) -> tuple[str, list[Any]]:
    """The statement that answers ``q``, and its parameters: newest first by
    ``started``, ties the newest stored first."""
    terms: list[str] = []
    args: list[Any] = []
    if q.route_id is not None:
        terms.append("route_id = %s")
        args.append(_text(q.route_id))
    if q.outcome is not None:
        terms.append("outcome = %s")
        args.append(q.outcome)
    if q.since is not None:
        terms.append("started >= %s")
        args.append(q.since)
    where = " WHERE " + " AND ".join(terms) if terms else ""
    return f"SELECT record FROM kapow_runs{where} ORDER BY started DESC, seq DESC LIMIT %s", [*args, q.limit]


#: The errors of a database that cannot be reached or cannot serve now
#: (connections refused or lost, a server shutting down, lock and statement
#: timeouts, deadlocks, a full disk): the call may succeed later.
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError)


class PostgresStore:
    """
    The run history in a PostgreSQL database that several servers may
    share. Make one with :meth:`open`.

    Every method may be called from any thread; each thread uses a
    connection of its own (see the module's docstring).
    """

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._connections = ThreadConnections(self._connect)

    @classmethod
    def open(cls, uri: str) -> PostgresStore:
        """
        The history in the PostgreSQL database of the libpq connection URI
        ``uri`` (the password from the URI, ``PGPASSWORD`` or ``~/.pgpass``),
        its schema made if absent and upgraded if older.

        :raises HistoryError: if ``uri`` is not a connection URI, the
            database cannot be reached or logged into (within
            :data:`CONNECT_TIMEOUT` seconds unless the URI says), or is of a
            newer schema than this code knows; ``str()`` says which in one
            line, with no password.
        """
        shown = shown_uri(uri)
        try:
            given = conninfo_to_dict(uri)
        except psycopg.Error as error:
            # libpq's message quotes the URI: shown without its password.
            reason = one_line(error).replace(uri, shown)
            raise HistoryError(f"not a PostgreSQL connection URI: {reason}") from None
        settings = {"connect_timeout": CONNECT_TIMEOUT, **_CONNECTION_DEFAULTS}
        conninfo = make_conninfo(
            uri, **{name: value for name, value in settings.items() if name not in given}
        )
        store = cls(conninfo)
        try:
            with store._connect() as connection:
                _prepare(connection)
        except (psycopg.Error, HistoryError) as error:
            raise HistoryError(f"cannot open the history database {shown}: {one_line(error)}") from None
        return store

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._conninfo, autocommit=True)

    def _connection(self) -> tuple[psycopg.Connection[Any], bool]:
        """This thread's connection, made on its first call (or after it was
        lost); and whether it is new."""
        connection = self._connections.current()
        if connection is not None and not connection.closed:
            return connection, False
        try:
            return self._connections.make(), True
        except psycopg.Error as error:
            raise HistoryUnavailable(f"cannot connect to the history database: {one_line(error)}") from None

    def _call(self, doing: str, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``work`` done on this thread's connection, with PostgreSQL's errors told as the store's."""
        connection, new = self._connection()
        try:
            return work(connection)
        except _UNAVAILABLE as error:
            # Every such error leaves the connection in doubt: make it again.
            lost = connection.broken or connection.closed
            self._connections.forget(connection)
            if self._connections.closed:
                raise HistoryError("the history database is closed") from None
            if lost and not new:
                # A connection kept since before a restart of the server:
                # the database may well be back, so try once on a new one.
                return self._call(doing, work)
            raise HistoryUnavailable(f"cannot {doing} the history database: {one_line(error)}") from None
        except psycopg.Error as error:
            raise HistoryError(f"cannot {doing} the history database: {one_line(error)}") from None

    def write(self, records: Sequence[RunRecord], results: Mapping[str, JobResult] | None, keep: int) -> None:
        """
        Store ``records`` in one transaction, each with its job's result if
        ``results`` has one under its id; a record whose id is stored already
        replaces it (and its result), keeping its place. Then drop the
        oldest records of the whole database beyond the newest ``keep``.

        :raises ValueError: if a record has no text ``id`` or no RFC 3339
            ``started`` (nothing is written).
        :raises HistoryUnavailable: if the database cannot be reached or
            written for now; nothing is written, unless the connection was
            lost as the transaction committed: writing the batch again
            then changes nothing.
        :raises HistoryError: if PostgreSQL refuses the batch otherwise.
        """
        if keep < 0:
            raise ValueError(f"keep must be 0 or more: {keep}")
        columns = _columns(records, results or {})

        def write(connection: psycopg.Connection[Any]) -> None:
            with connection.transaction():
                connection.execute(_LOCK, (_LOCK_TIMEOUT, _WRITE_TIMEOUT, _WRITE_LOCK))
                if columns[0]:
                    connection.execute(_UPSERT, columns)
                connection.execute(_RETAIN, (keep,))

        self._call("write", write)

    def query(self, q: HistoryQuery) -> list[RunRecord]:
        """The records ``q`` matches, newest first (by ``started``), at most ``q.limit``."""
        statement, args = query_sql(q)
        texts = self._call("read", lambda c: c.execute(statement, args).fetchall())
        return [json.loads(text) for (text,) in texts]

    def get(self, run_id: str) -> RunRecord | None:
        """The record of run ``run_id``, or ``None`` if none is stored."""
        row = self._call(
            "read",
            lambda c: c.execute("SELECT record FROM kapow_runs WHERE id = %s", (_text(run_id),)).fetchone(),
        )
        return None if row is None else json.loads(row[0])

    def job_result(self, run_id: str) -> JobResult | None:
        """The kept result of job ``run_id``, or ``None`` if no result is stored for it."""
        row = self._call(
            "read",
            lambda c: c.execute(
                "SELECT result_status, result_reason, result_headers, truncated, result_body"
                " FROM kapow_runs WHERE id = %s AND result_status IS NOT NULL",
                (_text(run_id),),
            ).fetchone(),
        )
        if row is None:
            return None
        status, reason, headers, truncated, body = row
        return JobResult(
            status=status,
            reason=json.loads(reason) if reason else "",
            headers=[
                (name.encode("latin-1"), value.encode("latin-1")) for name, value in json.loads(headers)
            ],
            body=bytes(body or b""),
            truncated=bool(truncated),
        )

    def count(self) -> int:
        """How many records are stored (of every server)."""
        row = self._call("read", lambda c: c.execute("SELECT count(*) FROM kapow_runs").fetchone())
        assert row is not None
        return int(row[0])

    def disconnect(self) -> None:
        """Close this thread's connection, if it has one (a thread that is done with the store)."""
        self._connections.forget_current()

    def close(self) -> None:
        """
        Close every connection, each thread's included: call it once no
        thread uses the store any more. Closing twice does nothing.
        """
        self._connections.close_all()


def _prepare(connection: psycopg.Connection[Any]) -> None:
    """Make the schema in a database that has none, upgrade an older one,
    refuse a newer one: one transaction, under the schema's advisory lock
    (servers that start at once take turns)."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        row = connection.execute("SELECT to_regclass('kapow_schema') IS NOT NULL").fetchone()
        if not (row and row[0]):
            found = connection.execute("SELECT to_regclass('kapow_runs') IS NOT NULL").fetchone()
            if found and found[0]:
                raise HistoryError("it holds a table kapow_runs but no kapow_schema: not a kapow history")
            for statement in _SCHEMA:
                connection.execute(statement)
            connection.execute("INSERT INTO kapow_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            return
        versions = connection.execute("SELECT version FROM kapow_schema").fetchall()
        if len(versions) != 1:
            raise HistoryError(f"its table kapow_schema holds {len(versions)} versions, not one")
        (version,) = versions[0]
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"its schema version {version} is newer than this kapow knows ({SCHEMA_VERSION})"
            )
        while version < SCHEMA_VERSION:
            if version not in _UPGRADES:
                raise HistoryError(f"its schema version {version} is not one this kapow knows")
            for statement in _UPGRADES[version]:
                connection.execute(statement)
            version += 1
            connection.execute("UPDATE kapow_schema SET version = %s", (version,))
