"""
The run history (SPEC.md §12) on a real server, alone and with
``--workers 2``: a record for each way a run ends, the control API's
queries and ``kapow history``, retention, a database file kept across a
restart (and across a SIGKILL), and the options' bad values.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.kapowserver import KAPOW, KapowServer, curl, wait_for


@pytest.fixture(params=[(), ("--workers", "2")], ids=["one", "workers"])
def either(request: Any, start_server: Any) -> KapowServer:
    return start_server(extra=request.param)


def history(server: KapowServer, query: str = "") -> list[dict[str, Any]]:
    result = server.curl_control(server.control + "/history" + query)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def record_of(server: KapowServer, handler_id: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        answer = server.curl_control("-w", "\n%{http_code}", server.control + "/history/" + handler_id)
        body, _, code = answer.stdout.rpartition("\n")
        return json.loads(body) if code == "200" else None

    return wait_for(found, 5, f"the record of {handler_id}")  # type: ignore[return-value]


def test_every_way_a_run_ends_leaves_its_record(either: KapowServer, tmp_path: Path) -> None:
    server = either
    routes = {
        "ok": server.add_route("/ok", f"echo $KAPOW_HANDLER_ID > {tmp_path}/ok; echo done | kapow set /response/body", "-X", "POST"),
        "error": server.add_route("/error", f"echo $KAPOW_HANDLER_ID > {tmp_path}/error; exit 3"),
        "signal": server.add_route("/signal", f"echo $KAPOW_HANDLER_ID > {tmp_path}/signal; kill -9 $$"),
        "timeout": server.add_route("/timeout", f"echo $KAPOW_HANDLER_ID > {tmp_path}/timeout; sleep 30", "--timeout", "0.5"),
        "disconnect": server.add_route("/disconnect", f"echo $KAPOW_HANDLER_ID > {tmp_path}/disconnect; sleep 30"),
        "killed": server.add_route("/killed", f"echo $KAPOW_HANDLER_ID > {tmp_path}/killed; sleep 30"),
    }  # fmt: skip
    before = time.time()
    assert curl("-s", "-d", "twelve bytes", server.user + "/ok").stdout == "done\n"
    assert curl("-s", "-o", "/dev/null", "-w", "%{http_code}", server.user + "/error").stdout == "200"
    curl("-s", server.user + "/signal")
    assert curl("-s", "-o", "/dev/null", "-w", "%{http_code}", server.user + "/timeout").stdout == "504"
    leaving = subprocess.Popen(["curl", "-s", server.user + "/disconnect"])
    wait_for(lambda: (tmp_path / "disconnect").exists(), what="the handler")
    leaving.kill()
    leaving.wait()
    killing = subprocess.Popen(["curl", "-s", server.user + "/killed"], stdout=subprocess.DEVNULL)
    wait_for(lambda: (tmp_path / "killed").exists(), what="the handler")
    killed_id = (tmp_path / "killed").read_text().strip()
    assert server.kapow("handler", "kill", killed_id).returncode == 0
    killing.wait(10)
    records = {}
    for outcome, route in routes.items():
        handler_id = (tmp_path / outcome).read_text().strip()
        record = record_of(server, handler_id)
        records[outcome] = record
        assert set(record) >= {
            "id", "route_id", "pattern", "method", "path", "remote", "started", "duration_s", "status",
            "outcome", "exit_status", "signal", "bytes_in", "bytes_out", "mode", "job",
        }  # fmt: skip
        assert (record["id"], record["route_id"], record["pattern"]) == (
            handler_id,
            route["id"],
            "/" + outcome,
        )
        assert (record["outcome"], record["remote"], record["mode"], record["job"]) == (
            outcome,
            "127.0.0.1",
            "http",
            False,
        )
        started = time.mktime(time.strptime(record["started"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        assert record["started"].endswith("Z") and before - 2 <= started <= time.time() + 1
        assert record["duration_s"] >= 0
    ok = records["ok"]
    assert (ok["method"], ok["path"], ok["status"], ok["exit_status"], ok["signal"]) == (
        "POST",
        "/ok",
        200,
        0,
        None,
    )
    assert (ok["bytes_in"], ok["bytes_out"]) == (12, 5)
    assert (records["error"]["exit_status"], records["error"]["status"]) == (3, 200)
    assert (records["signal"]["signal"], records["signal"]["exit_status"]) == (9, None)
    assert records["timeout"]["status"] == 504
    assert records["timeout"]["duration_s"] >= 0.5
    assert records["disconnect"]["status"] is None
    assert records["killed"]["signal"] == signal.SIGTERM
    listed = history(server, "?limit=6")
    assert [r["id"] for r in listed] == [records[o]["id"] for o in reversed(routes)]


def test_queries_filter_and_refuse_bad_values(server: KapowServer) -> None:
    a = server.add_route("/a", "true")
    b = server.add_route("/b", "exit 1")
    for path in ("/a", "/b", "/a", "/b", "/a"):
        curl("-s", server.user + path)
    wait_for(lambda: len(history(server)) == 5, what="five records")
    assert [r["pattern"] for r in history(server)] == ["/a", "/b", "/a", "/b", "/a"]
    assert {r["route_id"] for r in history(server, f"?route_id={a['id']}")} == {a["id"]}
    assert [r["route_id"] for r in history(server, "?outcome=error")] == [b["id"]] * 2
    assert len(history(server, "?limit=2")) == 2
    future = "2100-01-01T00:00:00Z"
    assert history(server, f"?since={future}") == []
    assert len(history(server, "?since=2000-01-01T00:00:00%2B02:00")) == 5
    limit = "limit must be a whole number from 1 to 10000, not "
    since = "since must be an RFC 3339 time with a zone (2026-12-07T10:00:00Z), not "
    for bad, detail in (
        ("?limit=0", limit + "'0'"),
        ("?limit=10001", limit + "'10001'"),
        ("?limit=x", limit + "'x'"),
        ("?outcome=meh", "outcome must be one of ok, error, signal, timeout, disconnect, killed, not 'meh'"),
        ("?since=yesterday", since + "'yesterday'"),
        ("?since=2026-12-07", since + "'2026-12-07'"),
    ):
        answer = server.curl_control("-w", "\n%{http_code}", server.control + "/history" + bad)
        body, _, code = answer.stdout.rpartition("\n")
        assert (code, json.loads(body)) == ("400", {"reason": "Invalid Query", "detail": detail}), bad
    missing = server.curl_control("-w", "\n%{http_code}", server.control + "/history/nope")
    body, _, code = missing.stdout.rpartition("\n")
    assert (code, json.loads(body)) == ("404", {"reason": "Run Not Found"})


def test_retention_keeps_the_newest(start_server: Any) -> None:
    server = start_server(extra=("--history-keep", "3"))
    server.add_route("/n/{n}", "true")
    for n in range(8):
        curl("-s", server.user + f"/n/{n}")
    wait_for(
        lambda: [r["path"] for r in history(server)] == ["/n/7", "/n/6", "/n/5"], what="the newest three"
    )


def test_a_database_file_outlives_a_restart_and_a_sigkill(start_server: Any, tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    first = start_server(extra=("--history", str(db)))
    first.add_route("/x", "true")
    for _ in range(3):
        curl("-s", first.user + "/x")
    wait_for(lambda: len(history(first)) == 3, what="three records")
    first.stop()
    second = start_server(extra=("--history", str(db)))
    assert len(history(second)) == 3
    second.add_route("/y", "true")
    load = subprocess.Popen(
        ["sh", "-c", f"while :; do curl -s {second.user}/y >/dev/null; done"], start_new_session=True
    )
    try:
        wait_for(lambda: len(history(second, "?limit=10000")) > 40, 20, what="records under load")
        time.sleep(1.5)
        stored_before = len(history(second, "?limit=10000"))
        os.killpg(second.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
    finally:
        os.killpg(load.pid, signal.SIGKILL)
        load.wait()
    second.process.wait(10)
    assert time.monotonic() - killed_at < 10
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    third = start_server(extra=("--history", str(db)))
    assert len(history(third, "?limit=10000")) >= stored_before


def test_history_off_keeps_nothing(start_server: Any) -> None:
    server = start_server(extra=("--history", "off"))
    server.add_route("/x", "echo $KAPOW_HANDLER_ID | kapow set /response/body")
    handler_id = curl("-s", server.user + "/x").stdout.strip()
    time.sleep(1.2)
    assert history(server) == []
    answer = server.curl_control(
        "-o", "/dev/null", "-w", "%{http_code}", server.control + "/history/" + handler_id
    )
    assert answer.stdout == "404"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--history", "/nonexistent/dir/h.sqlite3"), "--history /nonexistent/dir/h.sqlite3:"),
        (("--history-keep", "0"), "--history-keep must be at least 1"),
        (("--history-keep", "many"), "--history-keep must be a number"),
    ],
)
def test_bad_history_options_are_one_line_errors(
    flags: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [KAPOW, "server", "--bind", "127.0.0.1:0", "--control-bind", "127.0.0.1:0", "--data-bind", "127.0.0.1:0", *flags],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1, result
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_database_that_is_not_one_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"this is not a database, it is just some text\n" * 100)
    result = subprocess.run(
        [KAPOW, "server", "--bind", "127.0.0.1:0", "--control-bind", "127.0.0.1:0", "--data-bind", "127.0.0.1:0",
         "--history", str(junk)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"--history {junk}:" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_websocket_and_event_runs_are_recorded(server: KapowServer) -> None:
    route = server.add_route("/e", "echo one", "--mode", "events")
    assert curl("-sN", server.user + "/e").stdout == "data: one\n\n"
    record = wait_for(lambda: history(server), what="a record")[0]  # type: ignore[index]
    assert (record["route_id"], record["mode"], record["status"], record["outcome"]) == (
        route["id"],
        "events",
        200,
        "ok",
    )


def test_kapow_history_prints_a_table_json_and_one_run(server: KapowServer) -> None:
    server.add_route("/fine", "true")
    server.add_route("/broken", "exit 4")
    curl("-s", server.user + "/fine")
    curl("-s", server.user + "/broken")
    wait_for(lambda: len(history(server)) == 2, what="two records")
    table = server.kapow("history", "--outcome", "error")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["STARTED", "DURATION", "STATUS", "OUTCOME", "METHOD", "PATH", "ID"]
    assert len(rows) == 1 and rows[0].split()[2:6] == ["200", "error", "GET", "/broken"]
    run_id = rows[0].split()[-1]
    as_json = json.loads(server.kapow("history", "--json", "--limit", "1").stdout)
    assert [r["id"] for r in as_json] == [run_id]
    one = server.kapow("history", run_id)
    assert json.loads(one.stdout)["exit_status"] == 4
    missing = server.kapow("history", "nope")
    assert (missing.returncode, missing.stderr.strip()) == (1, "kapow: Run Not Found")
    bad = server.kapow("history", "--limit", "0")
    assert (bad.returncode, bad.stderr) == (
        1,
        "kapow: Invalid Query: limit must be a whole number from 1 to 10000, not '0'\n",
    )
