#!/usr/bin/env python3
"""
The run history (kapow.history), two ways:

``query``: a database filled with RECORDS run records (20 routes, most
runs ``ok``, one a second apart), then ``GET /history``'s query of the
newest 100 with no filter and with each filter and their combinations, each
timed as the median of 20 (records decoded included). An SQLite file, or
with ``--uri`` a PostgreSQL database (its table ``kapow_runs`` is filled if
it holds fewer records, and vacuumed and analyzed then, as autovacuum would
in time).

``sustained``: records handed to a ``HistoryWriter`` on the real reactor at
RATE a second for SECONDS, one in a hundred a job with a 4 KiB result, kept
to KEEP; every second the records stored, the ones dropped, and the size of
the database file and its write-ahead log (with ``--uri``: of the table),
which must level off.

Usage: python bench/bench_history.py query [--records N] [--path FILE | --uri postgresql://...]
       python bench/bench_history.py sustained [-d SECONDS] [--rate N] [--keep N] [--uri postgresql://...]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kapow.core.runs import HistoryQuery, JobResult, RunRecord, rfc3339
from kapow.history.base import Store, shown_uri
from kapow.history.store import HistoryStore

ROUTES = [f"route-{n:02d}" for n in range(20)]
#: Outcomes in the proportions a busy server might see (``killed`` rare).
OUTCOMES = ["ok"] * 90 + ["error"] * 6 + ["timeout"] * 2 + ["disconnect", "signal"]
RESULT = JobResult(
    status=200, reason="OK", headers=[(b"Content-Type", b"text/plain")], body=b"r" * 4096, truncated=False
)


#: Routes and outcomes drawn at random, the same on every run.
CHOOSE = random.Random(1)


def record(number: int, started: float) -> RunRecord:
    outcome = "killed" if number % 10_007 == 0 else CHOOSE.choice(OUTCOMES)
    return {
        "id": f"{number:08x}-5d2c-4b1e-9a7f-3c2b1a0f9e8d",
        "route_id": CHOOSE.choice(ROUTES),
        "pattern": "/items/{id}",
        "method": "GET",
        "path": f"/items/{number}",
        "remote": "192.0.2.7",
        "started": rfc3339(started),
        "duration_s": 0.012,
        "status": 200 if outcome == "ok" else 500,
        "outcome": outcome,
        "exit_status": 0 if outcome == "ok" else 1,
        "signal": None,
        "bytes_in": 0,
        "bytes_out": 512,
        "mode": "buffered",
        "job": False,
    }


def size(path: Path) -> int:
    return sum(os.path.getsize(f"{path}{end}") for end in ("", "-wal") if os.path.exists(f"{path}{end}"))


def fill(store: Store, count: int, start: float) -> None:
    began = time.perf_counter()
    batch = 50_000
    for first in range(0, count, batch):
        numbers = range(first, min(first + batch, count))
        store.write([record(n, start + n) for n in numbers], None, keep=count)
    print(f"filled {count:,} records in {time.perf_counter() - began:.1f} s")


def timed_ms(store: Store, q: HistoryQuery, times: int = 20) -> tuple[float, float, int]:
    """The first time and the median of ``times`` of ``q``, in ms, and the records found."""
    spent, found = [], 0
    for _ in range(times):
        began = time.perf_counter()
        found = len(store.query(q))
        spent.append(time.perf_counter() - began)
    return spent[0] * 1000, statistics.median(spent) * 1000, found


def bench_query(records: int, path: Path | None, uri: str | None) -> None:
    start = 1_780_000_000.0
    store: Store
    if uri is not None:
        from kapow.history.postgres import PostgresStore

        store = PostgresStore.open(uri)
        if store.count() < records:
            fill(store, records, start)
            vacuum(uri)
        print(f"{store.count():,} records, {postgres_size(uri) / 1e6:.0f} MB (table, indexes and TOAST)")
    else:
        assert path is not None
        store = HistoryStore.open(str(path))
        if store.count() < records:
            fill(store, records, start)
        print(f"{store.count():,} records, {size(path) / 1e6:.0f} MB (db + wal)")
    end = start + records
    queries = {
        "no filter": HistoryQuery(),
        "route_id": HistoryQuery(route_id="route-07"),
        "outcome=error (6%)": HistoryQuery(outcome="error"),
        "outcome=killed (0.01%)": HistoryQuery(outcome="killed"),
        "since (last hour)": HistoryQuery(since=end - 3600),
        "since (all)": HistoryQuery(since=start),
        "since (nothing newer)": HistoryQuery(since=end + 1),
        "route_id + outcome=timeout": HistoryQuery(route_id="route-07", outcome="timeout"),
        "route_id + since (last day)": HistoryQuery(route_id="route-07", since=end - 86_400),
        "outcome=error + since (last day)": HistoryQuery(outcome="error", since=end - 86_400),
        "all three": HistoryQuery(route_id="route-07", outcome="error", since=end - 86_400),
        "no filter, limit 10,000": HistoryQuery(limit=10_000),
    }
    for name, q in queries.items():
        first, median, found = timed_ms(store, q)
        print(f"{name:34} {median:8.2f} ms median of 20  (first {first:6.2f} ms, {found} records)")
    store.close()


def vacuum(uri: str) -> None:
    import psycopg

    began = time.perf_counter()
    with psycopg.connect(uri, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE kapow_runs")
    print(f"vacuumed and analyzed in {time.perf_counter() - began:.1f} s")


def postgres_size(uri: str) -> int:
    import psycopg

    with psycopg.connect(uri, autocommit=True) as connection:
        row = connection.execute("SELECT pg_total_relation_size('kapow_runs')").fetchone()
    assert row is not None
    return int(row[0])


def bench_sustained(seconds: int, rate: int, keep: int, path: Path, uri: str | None) -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.interfaces import IReactorThreads
    from twisted.internet.task import LoopingCall

    from kapow.history.writer import HistoryWriter

    store: Store
    if uri is not None:
        from kapow.history.postgres import PostgresStore

        store = PostgresStore.open(uri)
    else:
        store = HistoryStore.open(str(path))
    writer = HistoryWriter(store, keep, IReactorThreads(reactor))
    writer.start()
    numbers: Iterator[int] = itertools.count()
    tick = 0.01
    per_tick = rate * tick
    owed = 0.0
    began = time.monotonic()
    added = 0

    def feed() -> None:
        nonlocal owed, added
        owed += per_tick
        while owed >= 1:
            owed -= 1
            number = next(numbers)
            if number % 100 == 0:
                job = record(number, time.time()) | {"job": True, "stderr_tail": "e" * 200}
                writer.add(job, RESULT)
            else:
                writer.add(record(number, time.time()))
            added += 1

    def report() -> None:
        stored = store.count()  # on the reactor's thread: a benchmark may block it
        if uri is not None:
            print(
                f"{time.monotonic() - began:5.1f} s  added {added:8,}  stored {stored:6,}"
                f"  dropped {writer.dropped}  table {postgres_size(uri) / 1e6:6.1f} MB"
            )
            return
        print(
            f"{time.monotonic() - began:5.1f} s  added {added:8,}  stored {stored:6,}"
            f"  dropped {writer.dropped}  db {os.path.getsize(path) / 1e6:6.1f} MB"
            f"  wal {size(path) / 1e6 - os.path.getsize(path) / 1e6:5.1f} MB  total {size(path) / 1e6:6.1f} MB"
        )

    async def finish() -> None:
        feeding.stop()
        reporting.stop()
        await writer.stop()
        report()
        store.close()
        reactor.stop()

    feeding = LoopingCall(feed)
    reporting = LoopingCall(report)
    print(f"{rate:,} records/s for {seconds} s, keep {keep:,}, into {shown_uri(uri) if uri else path}")
    feeding.start(tick)
    reporting.start(1.0, now=False)
    reactor.callLater(seconds, lambda: ensureDeferred(finish()))
    reactor.run()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    modes = parser.add_subparsers(dest="mode", required=True)
    query = modes.add_parser("query", help="query times on a large database")
    query.add_argument("--records", type=int, default=1_000_000, help="records to fill (default 1,000,000)")
    where = query.add_mutually_exclusive_group()
    where.add_argument(
        "--path", type=Path, help="database file (kept, and reused if big enough; default a temporary one)"
    )
    where.add_argument(
        "--uri", help="a PostgreSQL database's URI instead of SQLite (filled if it holds fewer records)"
    )
    sustained = modes.add_parser("sustained", help="file size under sustained writes")
    sustained.add_argument("-d", type=int, default=30, help="seconds (default 30)")
    sustained.add_argument("--rate", type=int, default=2_000, help="records a second (default 2,000)")
    sustained.add_argument("--keep", type=int, default=10_000, help="--history-keep (default 10,000)")
    sustained.add_argument("--uri", help="a PostgreSQL database's URI instead of SQLite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.mode == "query":
            bench_query(args.records, args.path or Path(tmp) / "history.sqlite3", args.uri)
        else:
            bench_sustained(args.d, args.rate, args.keep, Path(tmp) / "history.sqlite3", args.uri)


if __name__ == "__main__":
    main()
