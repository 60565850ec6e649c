"""
The run history's database (kapow.history.store) on real SQLite files and in
memory, and its writer thread (kapow.history.writer) on the real reactor's
thread pool: what is written is found, filtered, replaced, kept within
``--history-keep``, survives a restart, and a database that is not ours is
refused with one line.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from kapow.core.runs import OUTCOMES, HistoryQuery, JobResult, RunRecord, rfc3339
from kapow.history.store import SCHEMA_VERSION, HistoryError, HistoryStore, query_sql
from kapow.history.writer import HistoryWriter

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


@pytest.fixture(params=["file", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HistoryStore]:
    opened = HistoryStore.open(str(tmp_path / "history.sqlite3") if request.param == "file" else None)
    yield opened
    opened.close()


def test_a_record_and_a_job_result_come_back_as_written(store: HistoryStore) -> None:
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


def test_an_empty_job_result_is_still_a_result(store: HistoryStore) -> None:
    empty = JobResult(status=204, reason="No Content", headers=[], body=b"", truncated=False)
    store.write([job_record(1)], {"run-000001": empty}, keep=10)
    assert store.job_result("run-000001") == empty


def test_queries_filter_and_answer_the_newest_first(store: HistoryStore) -> None:
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


def test_since_includes_a_run_that_started_at_that_moment(store: HistoryStore) -> None:
    store.write([run_record(1), run_record(2)], None, keep=10)
    assert [r["id"] for r in store.query(HistoryQuery(since=BASE + 2))] == ["run-000002"]


def test_runs_started_at_the_same_moment_come_newest_stored_first(store: HistoryStore) -> None:
    store.write([run_record(n, started=BASE) for n in range(5)], None, keep=10)
    assert [r["id"] for r in store.query(HistoryQuery())] == [f"run-{n:06d}" for n in (4, 3, 2, 1, 0)]


def test_a_record_of_a_stored_id_replaces_it(store: HistoryStore) -> None:
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


def test_a_batch_is_one_transaction(store: HistoryStore) -> None:
    store.write([run_record(1)], None, keep=10)
    broken = run_record(3)
    del broken["started"]
    with pytest.raises(ValueError):
        store.write([run_record(2), broken], None, keep=10)
    assert [r["id"] for r in store.query(HistoryQuery())] == ["run-000001"]
    with pytest.raises(ValueError):
        store.write([run_record(4)], None, keep=-1)


def test_only_the_newest_keep_records_stay(store: HistoryStore) -> None:
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


def test_each_thread_reads_while_another_writes(store: HistoryStore) -> None:
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


def test_a_closed_store_refuses_calls(store: HistoryStore) -> None:
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


class FailingOnce(HistoryStore):
    """A store whose first write fails as a full disk does."""

    failed = False

    def write(self, records: Sequence[RunRecord], results: Mapping[str, JobResult] | None, keep: int) -> None:
        if not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        super().write(records, results, keep)


class HistoryWriterTests(TestCase):
    """The writer thread and the pool's reads, on the real reactor."""

    def open(self, path: str | None = None, store_type: type[HistoryStore] = HistoryStore) -> HistoryStore:
        store = store_type.open(path)
        self.addCleanup(store.close)
        return store

    def writer(self, store: HistoryStore, keep: int = 10_000) -> HistoryWriter:
        writer = HistoryWriter(store, keep, THREADS)
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
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        writer.add(run_record(2))
        await writer.stop()
        self.assertEqual([r["id"] for r in store.query(HistoryQuery())], ["run-000002"])
        self.assertEqual(writer.dropped, 1)

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
