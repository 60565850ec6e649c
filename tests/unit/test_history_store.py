"""
The run history's databases on real SQLite files and in memory
(kapow.history.store) and on a real PostgreSQL (kapow.history.postgres, a
throwaway cluster of tests.support.postgres), the same cases for each, and
its writer thread (kapow.history.writer) on the real reactor's thread pool:
what is written is found, filtered, replaced, kept within
``--history-keep``, survives a restart and an outage of the database, and a
database that is not ours is refused with one line.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from kapow.core.runs import OUTCOMES, HistoryQuery, JobResult, RunRecord, rfc3339
from kapow.history.base import HistoryUnavailable, Store, yielding
from kapow.history.store import SCHEMA_VERSION, HistoryError, HistoryStore, query_sql
from kapow.history.writer import HistoryWriter
from tests.support.kapowserver import free_port
from tests.support.postgres import PASSWORD, Postgres, postgres  # noqa: F401  (the fixture)

T = TypeVar("T")

#: The real reactor, through the interface the writer takes it by.
THREADS = IReactorThreads(reactor)

BASE = 1_780_000_000.0  # seconds since the epoch, in 2026


def run_record(
    number: int, route_id: str = "r1", outcome: str = "ok", started: float | None = None
) -> RunRecord:
    """A run record with every field set, distinct per ``number``."""
    return {
        "id": f"run-{number:06d}",
        "route_id": route_id,
        "pattern": "/items/{id}",
        "method": "POST",
        "path": f"/items/{number}",
        "remote": "192.0.2.7",
        "started": rfc3339(BASE + number if started is None else started),
        "duration_s": 0.25,
        "status": 200 if outcome == "ok" else None,
        "outcome": outcome,
        "exit_status": 0 if outcome == "ok" else None,
        "signal": 9 if outcome == "killed" else None,
        "bytes_in": 10,
        "bytes_out": 2048,
        "mode": "buffered",
        "job": False,
    }


def job_record(number: int) -> RunRecord:
    record = run_record(number)
    record.update(job=True, stderr_tail="warn: caf\u00e9 \ufffd\n", truncated=True)
    return record


RESULT = JobResult(
    status=201,
    reason="Created",
    headers=[(b"Content-Type", b"text/plain"), (b"X-Raw", b"\xff\x00latin"), (b"Set-Cookie", b"a=1")],
    body=bytes(range(256)) * 10,
    truncated=True,
)


@pytest.fixture(params=["sqlite-file", "sqlite-memory", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened: Store
    if request.param == "postgres":
        from kapow.history.postgres import PostgresStore

        opened = PostgresStore.open(request.getfixturevalue("pg_uri"))
    else:
        opened = HistoryStore.open(
            str(tmp_path / "history.sqlite3") if request.param == "sqlite-file" else None
        )
    yield opened
    opened.close()


def test_a_record_and_a_job_result_come_back_as_written(store: Store) -> None:
    plain, job = run_record(1), job_record(2)
    store.write([plain, job], {job["id"]: RESULT}, keep=100)
    assert store.get(plain["id"]) == plain
    assert store.get(job["id"]) == job
    assert store.query(HistoryQuery()) == [job, plain]
    assert store.job_result(job["id"]) == RESULT
    assert store.job_result(plain["id"]) is None
    assert store.get("run-999999") is None
    assert store.job_result("run-999999") is None
    assert store.count() == 2


def test_fields_beyond_the_run_record_are_kept_as_they_are(store: Store) -> None:
    guarded = job_record(1) | {
        "server": "alpha",
        "_guard": {"bearer_tokens_file": "/etc/kapow/tokens", "allow": ["10.0.0.0/8"]},
        "_later": [1, None, {"deep": "caf\u00e9"}],
    }
    store.write([guarded, run_record(2) | {"server": "beta"}], {guarded["id"]: RESULT}, keep=10)
    assert store.get(guarded["id"]) == guarded
    assert store.query(HistoryQuery()) == [run_record(2) | {"server": "beta"}, guarded]
    assert store.query(HistoryQuery(outcome="ok", limit=1))[0]["server"] == "beta"


def test_text_a_database_column_cannot_hold_is_kept_and_found(store: Store) -> None:
    # NULs and a lone surrogate (the wire's bytes kept as surrogate escapes),
    # which PostgreSQL's text cannot hold: the record and result come back whole.
    odd = run_record(1, route_id="r\x00") | {"path": "/a\x00b\udce9", "stderr_tail": "\x00"}
    result = JobResult(
        status=200, reason="O\x00K", headers=[(b"X-A", b"\x00\xff")], body=b"\x00", truncated=False
    )
    store.write([odd, run_record(2)], {odd["id"]: result}, keep=10)
    assert store.get(odd["id"]) == odd
    assert store.query(HistoryQuery(route_id="r\x00")) == [odd]
    assert store.job_result(odd["id"]) == result


def test_a_record_given_twice_in_one_batch_is_stored_once_as_the_last(store: Store) -> None:
    done = job_record(1) | {"outcome": "timeout"}
    store.write([job_record(1), run_record(2), done], {done["id"]: RESULT}, keep=10)
    assert store.count() == 2
    assert store.query(HistoryQuery()) == [run_record(2), done]
    assert store.job_result(done["id"]) == RESULT


def test_an_empty_job_result_is_still_a_result(store: Store) -> None:
    empty = JobResult(status=204, reason="No Content", headers=[], body=b"", truncated=False)
    store.write([job_record(1)], {"run-000001": empty}, keep=10)
    assert store.job_result("run-000001") == empty


def test_queries_filter_and_answer_the_newest_first(store: Store) -> None:
    records = [
        run_record(n, route_id=("r1", "r2", "r3")[n % 3], outcome=OUTCOMES[n % len(OUTCOMES)])
        for n in range(300)
    ]
    # Stored out of order: newest first means by ``started``, not by arrival.
    store.write(records[150:], None, keep=1000)
    store.write(records[:150], None, keep=1000)
    for route_id, outcome, since, limit in itertools.product(
        (None, "r2", "absent"), (None, "timeout", "ok"), (None, BASE + 200, BASE + 299.5), (1, 7, 10_000)
    ):
        q = HistoryQuery(route_id=route_id, outcome=outcome, since=since, limit=limit)
        expected = [
            r
            for r in reversed(records)
            if route_id in (None, r["route_id"])
            and outcome in (None, r["outcome"])
            and (since is None or BASE + int(r["id"][4:]) >= since)
        ][:limit]
        assert store.query(q) == expected, q


def test_since_includes_a_run_that_started_at_that_moment(store: Store) -> None:
    store.write([run_record(1), run_record(2)], None, keep=10)
    assert [r["id"] for r in store.query(HistoryQuery(since=BASE + 2))] == ["run-000002"]


def test_runs_started_at_the_same_moment_come_newest_stored_first(store: Store) -> None:
    store.write([run_record(n, started=BASE) for n in range(5)], None, keep=10)
    assert [r["id"] for r in store.query(HistoryQuery())] == [f"run-{n:06d}" for n in (4, 3, 2, 1, 0)]


def test_a_record_of_a_stored_id_replaces_it(store: Store) -> None:
    store.write([run_record(1), job_record(2), run_record(3)], None, keep=10)
    done = job_record(2)
    done.update(outcome="timeout", status=None, duration_s=30.0)
    store.write([done], {done["id"]: RESULT}, keep=10)
    assert store.count() == 3
    assert store.get(done["id"]) == done
    assert store.job_result(done["id"]) == RESULT
    assert store.query(HistoryQuery(outcome="timeout")) == [done]
    assert store.query(HistoryQuery(outcome="ok", route_id="r1")) == [run_record(3), run_record(1)]
    # And again without a result: the whole row is replaced.
    store.write([run_record(2)], None, keep=10)
    assert store.job_result("run-000002") is None


def test_a_batch_is_one_transaction(store: Store) -> None:
    store.write([run_record(1)], None, keep=10)
    broken = run_record(3)
    del broken["started"]
    with pytest.raises(ValueError):
        store.write([run_record(2), broken], None, keep=10)
    assert [r["id"] for r in store.query(HistoryQuery())] == ["run-000001"]
    with pytest.raises(ValueError):
        store.write([run_record(4)], None, keep=-1)


def test_only_the_newest_keep_records_stay(store: Store) -> None:
    numbers = itertools.count()
    for _ in range(40):
        store.write([run_record(next(numbers)) for _ in range(37)], None, keep=100)
    assert store.count() == 100
    newest = [r["id"] for r in store.query(HistoryQuery(limit=10_000))]
    assert newest == [f"run-{n:06d}" for n in range(40 * 37 - 1, 40 * 37 - 101, -1)]
    # Replacing records leaves no gap that retention would miscount.
    store.write([run_record(40 * 37 - 1), run_record(40 * 37 - 2)], None, keep=100)
    assert store.count() == 100
    store.write([], None, keep=10)
    assert store.count() == 10


def db_size(path: Path) -> int:
    return sum(
        os.path.getsize(f"{path}{suffix}") for suffix in ("", "-wal") if os.path.exists(f"{path}{suffix}")
    )


def test_the_file_stays_bounded_under_retention(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    store = HistoryStore.open(str(path))
    numbers = itertools.count()
    padding = "x" * 2000

    def batches(count: int) -> None:
        for _ in range(count):
            batch = [job_record(next(numbers)) | {"stderr_tail": padding} for _ in range(50)]
            store.write(batch, {r["id"]: RESULT for r in batch[:5]}, keep=500)

    batches(30)  # 1,500 records: three times what is kept
    settled = db_size(path)
    batches(120)  # four times as many again
    assert store.count() == 500
    assert db_size(path) <= settled * 1.25, (settled, db_size(path))
    store.close()


def test_a_second_store_on_the_same_file_sees_the_records(tmp_path: Path) -> None:
    path = str(tmp_path / "history.sqlite3")
    first = HistoryStore.open(path)
    first.write([run_record(1), job_record(2)], {"run-000002": RESULT}, keep=10)
    first.close()
    again = HistoryStore.open(path)
    assert again.query(HistoryQuery()) == [job_record(2), run_record(1)]
    assert again.job_result("run-000002") == RESULT
    again.close()


def test_each_thread_reads_while_another_writes(store: Store) -> None:
    errors: list[BaseException] = []
    writing = True

    def read() -> None:
        try:
            while writing:
                found = store.query(HistoryQuery(limit=50))
                assert found == sorted(found, key=lambda r: r["started"], reverse=True)
            store.disconnect()
        except BaseException as error:
            errors.append(error)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for batch in range(50):
            store.write([run_record(batch * 20 + n) for n in range(20)], None, keep=300)
    finally:
        writing = False
        for reader in readers:
            reader.join()
    assert errors == []
    assert store.count() == 300


def test_a_closed_store_refuses_calls(store: Store) -> None:
    store.close()
    with pytest.raises(HistoryError):
        store.get("run-000001")
    store.close()


def test_a_file_is_in_wal_mode_with_our_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    HistoryStore.open(str(path)).close()
    look = sqlite3.connect(path)
    assert look.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert look.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    look.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    HistoryStore.open(str(path)).close()
    newer = sqlite3.connect(path)
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.close()
    with pytest.raises(HistoryError, match="newer") as refused:
        HistoryStore.open(str(path))
    assert "\n" not in str(refused.value)


def test_a_database_of_something_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite3"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE accounts (name TEXT)")
    other.close()
    with pytest.raises(HistoryError, match="not a kapow history"):
        HistoryStore.open(str(path))


@pytest.mark.parametrize("kind", ["directory", "missing directory", "not a database"])
def test_a_path_that_cannot_be_a_database_is_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    path = {
        "directory": tmp_path,
        "missing directory": tmp_path / "missing" / "history.sqlite3",
        "not a database": tmp_path / "notes.txt",
    }[kind]
    if kind == "not a database":
        path.write_text("these are not the pages of a database, just some words of text\n" * 20)
    with pytest.raises(HistoryError) as refused:
        HistoryStore.open(str(path))
    message = str(refused.value)
    assert str(path) in message
    assert "\n" not in message
    if kind == "not a database":
        assert path.read_text().startswith("these are not")  # left as it was


@pytest.mark.parametrize(
    "q",
    [
        HistoryQuery(route_id=route_id, outcome=outcome, since=since)
        for route_id, outcome, since in itertools.product((None, "r1"), (None, "error"), (None, BASE))
    ],
    ids=repr,
)
def test_every_query_walks_an_index_in_order(tmp_path: Path, q: HistoryQuery) -> None:
    path = tmp_path / "history.sqlite3"
    HistoryStore.open(str(path)).close()
    look = sqlite3.connect(path)
    sql, args = query_sql(q)
    plan = " | ".join(row[3] for row in look.execute("EXPLAIN QUERY PLAN " + sql, args))
    look.close()
    assert "USING INDEX" in plan, plan
    assert "TEMP B-TREE" not in plan, plan
    assert "SCAN runs USING INDEX" not in plan or q == HistoryQuery(), plan


# PostgreSQL's own: servers sharing a database, its schema, its connections.


@pytest.fixture
def pg(postgres: Postgres) -> Postgres:  # noqa: F811  (the fixture's name)
    """The session's PostgreSQL cluster."""
    return postgres


@pytest.fixture
def pg_uri(pg: Postgres) -> str:
    """A new database of its own, for one test."""
    return pg.new_database()


def pg_open(uri: str) -> Store:
    from kapow.history.postgres import PostgresStore

    return PostgresStore.open(uri)


def pg_rows(uri: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(uri, autocommit=True) as connection:
        cursor = connection.execute(sql.encode())
        return cursor.fetchall() if cursor.description else []


def test_two_servers_writing_at_once_share_one_history(pg_uri: str) -> None:
    uri = pg_uri
    stores = [pg_open(uri), pg_open(uri)]
    errors: list[BaseException] = []

    def serve(index: int) -> None:
        server, store = "ab"[index], stores[index]
        try:
            previous: RunRecord | None = None
            for batch in range(40):
                records = [
                    run_record(index * 100_000 + batch * 20 + n) | {"server": server} for n in range(20)
                ]
                # The last batch's last record again, as after a lost connection.
                store.write(records + ([previous] if previous else []), None, keep=300)
                previous = records[-1]
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # Exactly the newest 300 of both, each once, numbered without a gap.
    assert pg_rows(uri, "SELECT count(*), count(DISTINCT id), max(seq) - min(seq) + 1 FROM kapow_runs") == [
        (300, 300, 300)
    ]
    assert stores[0].count() == stores[1].count() == 300
    newest = stores[1].query(HistoryQuery(limit=10_000))
    assert {r["server"] for r in newest} == {"a", "b"}
    assert len({r["id"] for r in newest}) == 300
    for store in stores:
        store.close()


def test_servers_starting_at_once_make_the_schema_once(pg_uri: str) -> None:
    uri = pg_uri
    opened: list[Store] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(pg_open(uri))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert pg_rows(uri, "SELECT version FROM kapow_schema") == [(1,)]
    opened[0].write([run_record(1)], None, keep=10)
    assert [store.count() for store in opened] == [1] * 6
    for store in opened:
        store.close()


def test_a_newer_postgresql_schema_is_refused(pg_uri: str) -> None:
    from kapow.history.postgres import SCHEMA_VERSION as PG_SCHEMA_VERSION

    uri = pg_uri
    pg_open(uri).close()
    pg_rows(uri, f"UPDATE kapow_schema SET version = {PG_SCHEMA_VERSION + 1} RETURNING version")
    with pytest.raises(HistoryError, match="newer") as refused:
        pg_open(uri)
    assert "\n" not in str(refused.value)


def test_a_postgresql_database_of_something_else_is_refused(pg_uri: str) -> None:
    uri = pg_uri
    pg_rows(uri, "CREATE TABLE kapow_runs (name text)")
    with pytest.raises(HistoryError, match="not a kapow history"):
        pg_open(uri)


@pytest.mark.parametrize(
    "kind", ["malformed", "not postgresql", "unreachable port", "wrong password", "unknown database"]
)
def test_a_postgresql_uri_that_leads_nowhere_is_refused_in_one_line(pg: Postgres, kind: str) -> None:
    uri = {
        "malformed": "postgresql://kapow:secret@[not a uri",
        "not postgresql": "postgresql://kapow:secret@127.0.0.1:1/x?sslmode=bogus",
        "unreachable port": f"postgresql://kapow:secret@127.0.0.1:{free_port()}/x",
        "wrong password": pg.uri("postgres", password="secret"),
        "unknown database": pg.uri("nowhere").replace(PASSWORD, "secret"),
    }[kind]
    started = time.monotonic()
    with pytest.raises(HistoryError) as refused:
        pg_open(uri)
    message = str(refused.value)
    assert "\n" not in message
    assert "secret" not in message
    assert time.monotonic() - started < 5
    if kind == "wrong password":
        assert "password authentication failed" in message


def test_a_connection_lost_is_made_again(pg: Postgres, pg_uri: str) -> None:
    uri = pg_uri
    store = pg_open(uri)
    store.write([run_record(1)], None, keep=10)
    assert store.count() == 1
    # Every connection to the database cut, as by a restart or a failover.
    database = uri.rsplit("/", 1)[1]
    pg.admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
    assert store.get("run-000001") == run_record(1)
    pg.admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
    store.write([run_record(2)], None, keep=10)
    assert store.count() == 2
    store.close()
    with pytest.raises(HistoryError):
        store.count()


@pytest.mark.parametrize(
    "q",
    [
        HistoryQuery(route_id=route_id, outcome=outcome, since=since)
        for route_id, outcome, since in itertools.product((None, "r1"), (None, "error"), (None, BASE))
    ],
    ids=repr,
)
def test_every_postgresql_query_walks_an_index_in_order(pg_uri: str, q: HistoryQuery) -> None:
    import psycopg

    from kapow.history.postgres import query_sql as pg_query_sql

    uri = pg_uri
    pg_open(uri).close()
    statement, args = pg_query_sql(q)
    with psycopg.connect(uri, autocommit=True) as connection:
        # Forbidden unless nothing else answers: a scan of the whole table,
        # and sorting (an index must give the order).
        connection.execute("SET enable_seqscan = off; SET enable_sort = off; SET enable_bitmapscan = off")
        plan = " | ".join(row[0] for row in connection.execute(f"EXPLAIN {statement}".encode(), args))
    assert "Index Scan Backward" in plan, plan
    assert "Sort" not in plan, plan
    assert "Filter" not in plan, plan


# The writer.


class FailingOnce(HistoryStore):
    """A store whose first write is refused for good."""

    failed = False

    def write(self, records: Sequence[RunRecord], results: Mapping[str, JobResult] | None, keep: int) -> None:
        if not self.failed:
            self.failed = True
            raise HistoryError("cannot write the history database: constraint failed")
        super().write(records, results, keep)


class OutOfReach:
    """
    A store in front of another that, while :attr:`down` is set, fails as a
    database out of reach does; it remembers the ids of every record it
    passed on.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.down = threading.Event()
        self.written: list[str] = []

    def _check(self) -> None:
        if self.down.is_set():
            raise HistoryUnavailable("cannot reach the history database: connection refused")

    def write(self, records: Sequence[RunRecord], results: Mapping[str, JobResult] | None, keep: int) -> None:
        self._check()
        self.store.write(records, results, keep)
        self.written.extend(record["id"] for record in records)

    def query(self, q: HistoryQuery) -> list[RunRecord]:
        self._check()
        return self.store.query(q)

    def get(self, run_id: str) -> RunRecord | None:
        self._check()
        return self.store.get(run_id)

    def job_result(self, run_id: str) -> JobResult | None:
        self._check()
        return self.store.job_result(run_id)

    def count(self) -> int:
        return self.store.count()

    def disconnect(self) -> None:
        self.store.disconnect()

    def close(self) -> None:
        self.store.close()


#: Quick retries, for tests.
QUICK = (0.05, 0.2)


class HistoryWriterTests(TestCase):
    """The writer thread and the pool's reads, on the real reactor."""

    def open(self, path: str | None = None, store_type: type[HistoryStore] = HistoryStore) -> HistoryStore:
        store = store_type.open(path)
        self.addCleanup(store.close)
        return store

    def writer(self, store: Store, keep: int = 10_000, **options: Any) -> HistoryWriter:
        writer = HistoryWriter(store, keep, THREADS, **options)
        writer.start()
        self.addCleanup(writer.stop)
        return writer

    async def eventually(self, check: Callable[[], Awaitable[T]], within: float = 1.0) -> T:
        """The first true result of ``check``, asked until ``within`` seconds have passed."""
        deadline = time.monotonic() + within
        while True:
            found = await check()
            if found:
                return found
            self.assertLess(time.monotonic(), deadline, "not within the time")
            await deferLater(reactor, 0.02, lambda: None)

    async def test_a_record_added_is_found_within_a_second(self) -> None:
        path = self.mktemp()
        writer = self.writer(self.open(path))
        started = time.monotonic()
        writer.add(run_record(1))
        found = await self.eventually(lambda: writer.get("run-000001"))
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(found, run_record(1))
        self.assertEqual(await writer.query(HistoryQuery(route_id="r1")), [run_record(1)])
        await writer.stop()
        check = sqlite3.connect(path)
        self.assertEqual(check.execute("PRAGMA integrity_check").fetchall(), [("ok",)])
        check.close()
        self.assertEqual(self.open(path).get("run-000001"), run_record(1))  # as a restarted server

    async def test_a_job_result_is_read_back(self) -> None:
        writer = self.writer(self.open())
        writer.add(job_record(7), RESULT)
        self.assertEqual(await self.eventually(lambda: writer.job_result("run-000007")), RESULT)
        self.assertIsNone(await writer.job_result("run-000001"))

    async def test_stop_writes_what_is_queued_and_later_records_are_dropped(self) -> None:
        path = self.mktemp()
        store = self.open(path)
        writer = self.writer(store, keep=2_000)
        for number in range(2_500):
            writer.add(run_record(number))
        await writer.stop()
        writer.add(run_record(9_999))
        writer.add(run_record(9_998))
        self.assertEqual(writer.dropped, 2)
        self.assertEqual(store.count(), 2_000)
        self.assertEqual(store.query(HistoryQuery(limit=1)), [run_record(2_499)])
        self.assertIsNone(store.get("run-009999"))
        await writer.stop()  # stopping twice is fine

    async def test_a_refused_batch_is_counted_and_the_writer_goes_on(self) -> None:
        store = self.open(self.mktemp(), FailingOnce)
        writer = self.writer(store)
        writer.add(run_record(1))
        await self.eventually(lambda: succeed(writer.dropped == 1))
        self.assertEqual(len(self.flushLoggedErrors(HistoryError)), 1)
        writer.add(run_record(2))
        await writer.stop()
        self.assertEqual([r["id"] for r in store.query(HistoryQuery())], ["run-000002"])
        self.assertEqual(writer.dropped, 1)
        self.assertTrue(writer.available)

    async def test_records_wait_while_the_database_is_out_of_reach_and_arrive_once(self) -> None:
        store = OutOfReach(self.open())
        writer = self.writer(store, retry=QUICK)
        writer.add(run_record(1))
        await self.eventually(lambda: writer.get("run-000001"))
        store.down.set()
        for number in range(2, 40):
            writer.add(run_record(number), RESULT if number == 7 else None)
        await self.eventually(lambda: succeed(not writer.available))
        for read in (writer.query(HistoryQuery()), writer.get("run-000001"), writer.job_result("run-000007")):
            await self.assertFailure(read, HistoryUnavailable)
        await deferLater(reactor, 0.5, lambda: None)  # several tries
        self.assertFalse(writer.available)
        self.assertEqual(store.count(), 1)
        writer.add(run_record(40))  # waits behind the others
        store.down.clear()
        await self.eventually(lambda: succeed(writer.available and store.count() == 40))
        self.assertEqual(store.written, [f"run-{n:06d}" for n in range(1, 41)])  # in order, once each
        self.assertEqual(await writer.job_result("run-000007"), RESULT)
        self.assertEqual(writer.dropped, 0)

    async def test_at_most_hold_records_wait_and_the_oldest_are_dropped(self) -> None:
        store = OutOfReach(self.open())
        store.down.set()
        writer = self.writer(store, hold=100, retry=QUICK)
        for number in range(250):
            writer.add(run_record(number))
        self.assertEqual(writer.dropped, 150)
        await self.eventually(lambda: succeed(not writer.available))
        for number in range(250, 260):
            writer.add(run_record(number))
        store.down.clear()
        await self.eventually(lambda: succeed(writer.available and store.count() == 100))
        self.assertEqual(sorted(store.written), [f"run-{n:06d}" for n in range(160, 260)])
        self.assertEqual(writer.dropped, 160)

    async def test_a_failed_read_marks_it_out_of_reach_until_a_write_succeeds(self) -> None:
        store = OutOfReach(self.open())
        writer = self.writer(store, retry=QUICK)
        store.down.set()
        await self.assertFailure(writer.get("run-000001"), HistoryUnavailable)
        self.assertFalse(writer.available)
        await deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(writer.available)
        store.down.clear()  # with no record to write, the writer's tries find it back
        await self.eventually(lambda: succeed(writer.available))

    async def test_a_stop_while_out_of_reach_gives_up_in_time_and_counts_the_lost(self) -> None:
        store = OutOfReach(self.open())
        store.down.set()
        writer = self.writer(store, retry=QUICK, stop_wait=0.3)
        for number in range(5):
            writer.add(run_record(number))
        await self.eventually(lambda: succeed(not writer.available))
        started = time.monotonic()
        await writer.stop()
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual((writer.dropped, store.count()), (5, 0))

    async def test_a_writer_stopped_before_it_started_drops_what_it_was_given(self) -> None:
        store = self.open()
        writer = HistoryWriter(store, 10, THREADS)
        writer.add(run_record(1))
        await writer.stop()
        self.assertEqual((writer.dropped, store.count()), (1, 0))

    async def test_as_a_service_it_closes_the_store_when_stopped(self) -> None:
        path = self.mktemp()
        store = HistoryStore.open(path)
        writer = HistoryWriter(store, 10, THREADS)
        writer.startService()
        writer.add(run_record(1))
        await writer.stopService()
        with self.assertRaises(HistoryError):
            store.count()
        self.assertEqual(self.open(path).count(), 1)


class PostgresWriterTests(TestCase):
    """The writer on a real PostgreSQL that stops and starts again under it."""

    @pytest.fixture(autouse=True)
    def cluster(self, pg: Postgres) -> None:
        self.postgres = pg

    def writer(self, store: Store, **options: Any) -> HistoryWriter:
        writer = HistoryWriter(store, 10_000, THREADS, **options)
        writer.start()
        self.addCleanup(writer.stop)
        return writer

    eventually = HistoryWriterTests.eventually

    async def test_records_wait_through_a_stop_of_postgresql_and_arrive_once(self) -> None:
        uri = self.postgres.new_database()
        store = pg_open(uri)
        self.addCleanup(store.close)
        writer = self.writer(store, retry=(0.1, 0.5))
        for number in range(10):
            writer.add(run_record(number))
        await self.eventually(lambda: succeed(store.count() == 10))
        self.assertEqual(len(await writer.query(HistoryQuery())), 10)  # a pool thread's connection
        self.postgres.stop()
        try:
            for number in range(10, 30):
                writer.add(job_record(number), RESULT)
            await self.eventually(lambda: succeed(not writer.available), within=3)
            await self.assertFailure(writer.job_result("run-000011"), HistoryUnavailable)
            await deferLater(reactor, 0.5, lambda: None)
            writer.add(run_record(30))
        finally:
            self.postgres.start()
        await self.eventually(lambda: succeed(writer.available), within=3)
        await self.eventually(
            lambda: writer.query(HistoryQuery(limit=100)).addCallback(lambda r: len(r) == 31)
        )
        self.assertEqual(
            pg_rows(uri, "SELECT count(*), count(DISTINCT id), max(seq) - min(seq) + 1 FROM kapow_runs"),
            [(31, 31, 31)],
        )
        self.assertEqual(await writer.job_result("run-000029"), RESULT)
        self.assertEqual(writer.dropped, 0)

    async def test_a_stop_while_postgresql_is_down_is_bounded(self) -> None:
        store = pg_open(self.postgres.new_database())
        writer = HistoryWriter(store, 10_000, THREADS, retry=(0.1, 0.5), stop_wait=0.5)
        writer.startService()
        writer.add(run_record(1))
        await self.eventually(lambda: succeed(store.count() == 1))
        self.postgres.stop()
        try:
            for number in range(2, 12):
                writer.add(run_record(number))
            started = time.monotonic()
            await writer.stopService()
            self.assertLess(time.monotonic() - started, 3.0)
        finally:
            self.postgres.start()
        self.assertEqual(writer.dropped, 10)


def test_a_batch_is_prepared_with_pauses_for_the_reactor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every item, in order, with a pause (a sleep of 0, which lets go of the lock) after every ``every``."""
    pauses: list[float] = []
    monkeypatch.setattr("kapow.history.base.time.sleep", pauses.append)
    assert list(yielding(range(50), every=7)) == list(range(50))
    assert pauses == [0] * 7
    assert list(yielding([])) == []
    assert pauses == [0] * 7
