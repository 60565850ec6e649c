"""
Queues and the live handlers on the control API, end to end: a real server,
real clients (curl, raw sockets) and the real ``kapow handler`` command.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.kapowserver import KapowServer, curl, group_members, read_int, wait_for


def handlers(server: KapowServer) -> list[dict]:
    result = server.kapow("handler", "list")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def states(server: KapowServer) -> list[str]:
    return [h["state"] for h in handlers(server)]


class Client:
    """One curl request in the background: ``result`` once it is done."""

    def __init__(self, url: str, *args: str) -> None:
        self.result: subprocess.CompletedProcess[str] | None = None
        self.started = time.monotonic()
        self.finished = 0.0
        self._thread = threading.Thread(target=self._run, args=(url, args), daemon=True)
        self._thread.start()

    def _run(self, url: str, args: tuple[str, ...]) -> None:
        self.result = curl("-i", *args, url)
        self.finished = time.monotonic()

    def wait(self, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        self._thread.join(timeout)
        assert self.result is not None, "the request did not end"
        return self.result

    @property
    def status(self) -> int:
        return int(self.wait().stdout.split(None, 2)[1])


def user_socket(server: KapowServer) -> socket.socket:
    host, port = server.user.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)))


def test_a_queue_runs_requests_one_after_another_in_arrival_order(
    server: KapowServer, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    route = server.add_route(
        "/deploy",
        f'n=$(kapow get /request/params/n); echo "start $n" >> {log}; sleep 0.3; echo "end $n" >> {log};'
        ' printf %s "$n" | kapow set /response/body',
        "--max-concurrency", "1", "--queue", "5",
    )  # fmt: skip
    assert (route["max_concurrency"], route["queue"]) == (1, 5)

    def ended() -> int:
        return log.read_text().count("end ") if log.exists() else 0

    clients = []
    for n in range(4):
        clients.append(Client(f"{server.user}/deploy?n={n}"))
        # the next one is sent once this one is in: running, queued behind the others, or done
        wait_for(lambda sent=n + 1: len(handlers(server)) + ended() == sent, what=f"request {n} to arrive")
    bodies = [c.wait().stdout.rsplit("\n", 1)[-1] for c in clients]
    assert [c.status for c in clients] == [200] * 4
    assert bodies == ["0", "1", "2", "3"]
    assert log.read_text().split("\n") == [f"{what} {n}" for n in range(4) for what in ("start", "end")] + [
        ""
    ]


def test_a_full_queue_answers_503_at_once(server: KapowServer, tmp_path: Path) -> None:
    go = tmp_path / "go"
    server.add_route(
        "/one",
        f"while [ ! -e {go} ]; do sleep 0.02; done; kapow set /response/body ok",
        "--max-concurrency", "1", "--queue", "1",
    )  # fmt: skip
    running = Client(server.user + "/one")
    wait_for(lambda: states(server) == ["running"], what="the first handler")
    queued = Client(server.user + "/one")
    wait_for(lambda: sorted(states(server)) == ["queued", "running"], what="the second to queue")
    try:
        refused = curl("-i", server.user + "/one")
        assert refused.stdout.startswith("HTTP/1.1 503 ")
        assert "Retry-After: 1" in refused.stdout
        server.wait_log(r"refused GET /one: route queue of 1 is full")
    finally:
        go.touch()
    assert (running.status, queued.status) == (200, 200)


def test_a_request_queued_past_its_queue_timeout_gets_503(server: KapowServer, tmp_path: Path) -> None:
    go = tmp_path / "go"
    server.add_route(
        "/slow",
        f"while [ ! -e {go} ]; do sleep 0.02; done",
        "--max-concurrency", "1", "--queue", "3", "--queue-timeout", "0.5",
    )  # fmt: skip
    running = Client(server.user + "/slow")
    wait_for(lambda: states(server) == ["running"], what="the first handler")
    try:
        late = Client(server.user + "/slow")
        assert late.status == 503 and "Retry-After: 1" in late.wait().stdout
        assert late.finished - late.started >= 0.5
        server.wait_log(r"refused GET /slow: waited 0.5s in the queue")
        assert states(server) == ["running"]
    finally:
        go.touch()
    assert running.status == 200


def test_a_client_that_leaves_while_queued_never_gets_a_process(server: KapowServer, tmp_path: Path) -> None:
    go, ran = tmp_path / "go", tmp_path / "ran"
    server.add_route(
        "/job",
        f"kapow get /request/params/n >> {ran}; echo >> {ran}; while [ ! -e {go} ]; do sleep 0.02; done",
        "--max-concurrency", "1", "--queue", "5",
    )  # fmt: skip
    first = Client(server.user + "/job?n=first")
    wait_for(lambda: states(server) == ["running"], what="the first handler")
    with user_socket(server) as s:
        s.sendall(b"GET /job?n=gone HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: sorted(states(server)) == ["queued", "running"], what="the second to queue")
    server.wait_log(r"handler [0-9a-f]{32} of route \S+ left the queue: its client left")
    assert states(server) == ["running"]
    third = Client(server.user + "/job?n=third")
    wait_for(lambda: sorted(states(server)) == ["queued", "running"], what="the third to queue")
    go.touch()
    assert (first.status, third.status) == (200, 200)
    assert ran.read_text().split() == ["first", "third"]


def test_time_spent_queued_does_not_count_toward_the_timeout(server: KapowServer, tmp_path: Path) -> None:
    server.add_route(
        "/timed", "sleep 1.2; kapow set /response/body done",
        "--max-concurrency", "1", "--queue", "1", "--timeout", "2",
    )  # fmt: skip
    first = Client(server.user + "/timed")
    wait_for(lambda: states(server) == ["running"], what="the first handler")
    second = Client(server.user + "/timed")  # waits about 1.2s, then runs 1.2s: 2.4s > 2s in all
    assert (first.status, second.status) == (200, 200)
    assert second.wait().stdout.endswith("done")
    assert second.finished - second.started > 2


def test_the_server_queue_for_max_handlers(start_server, tmp_path: Path) -> None:
    server = start_server(extra=("--max-handlers", "1", "--queue", "1", "--queue-timeout", "20"))
    go = tmp_path / "go"
    server.add_route("/a", f"while [ ! -e {go} ]; do sleep 0.02; done; kapow set /response/body a")
    server.add_route("/b", "kapow set /response/body b")
    running = Client(server.user + "/a")
    wait_for(lambda: states(server) == ["running"], what="the first handler")
    queued = Client(server.user + "/b")
    wait_for(lambda: sorted(states(server)) == ["queued", "running"], what="the second to queue")
    try:
        refused = curl("-i", server.user + "/b")
        assert refused.stdout.startswith("HTTP/1.1 503 ")
        server.wait_log(r"refused GET /b: server queue of 1 is full")
    finally:
        go.touch()
    assert (running.status, queued.status) == (200, 200)
    assert queued.wait().stdout.endswith("\n\nb")


def test_handler_list_get_and_kill(server: KapowServer, tmp_path: Path) -> None:
    pidfile = tmp_path / "pgid"
    route = server.add_route(
        "/work",
        f"kapow set /response/status 202; kapow set /response/headers/X-Done no; echo $$ > {pidfile};"
        " sleep 1000 & sleep 1000 & wait",
    )
    streaming = server.add_route("/stream", "kapow set /response/stream partial; sleep 1000")
    ended = server.add_route(
        "/later", "kapow set /response/body early; kapow set /response/end 1; sleep 1000"
    )
    client = Client(server.user + "/work?x=1")
    pgid = read_int(pidfile)
    other = Client(server.user + "/stream")
    early = Client(server.user + "/later")
    assert early.wait().stdout.endswith("early")  # answered, while its process runs on
    try:
        wait_for(lambda: sorted(states(server)) == ["ended", "running", "streaming"], what="the handlers")
        listed = {h["route_id"]: h for h in handlers(server)}
        work = listed[route["id"]]
        assert set(work) == {"id", "route_id", "method", "path", "remote", "pid", "started", "state"}
        assert (work["method"], work["path"], work["remote"], work["pid"], work["state"]) == (
            "GET", "/work", "127.0.0.1", pgid, "running",
        )  # fmt: skip
        assert work["started"].endswith("Z") and work["started"][:2] == "20"
        assert listed[streaming["id"]]["state"] == "streaming"
        assert listed[ended["id"]]["state"] == "ended"
        shown = server.kapow("handler", "get", work["id"])
        assert shown.returncode == 0 and json.loads(shown.stdout) == work
        assert len(group_members(pgid)) == 3

        killed = server.kapow("handler", "kill", work["id"])
        assert (killed.returncode, killed.stdout, killed.stderr) == (0, "", "")
        answer = client.wait().stdout
        assert answer.startswith("HTTP/1.1 202 ") and "X-Done: no" in answer  # completed as at exit
        wait_for(lambda: not group_members(pgid), what="the handler's whole group to end")
        server.wait_log(rf"handler {work['id']} of route {route['id']}: killed over the control API")
        gone = server.kapow("handler", "get", work["id"])
        assert (gone.returncode, gone.stdout, gone.stderr) == (1, "", "kapow: Handler Not Found\n")
        again = server.kapow("handler", "kill", work["id"])
        assert (again.returncode, again.stderr) == (1, "kapow: Handler Not Found\n")
        assert sorted(h["route_id"] for h in handlers(server)) == sorted([streaming["id"], ended["id"]])
    finally:
        for h in handlers(server):
            server.kapow("handler", "kill", h["id"])
    assert other.wait().stdout.endswith("partial")


def test_killing_a_queued_handler_answers_its_client_503(server: KapowServer, tmp_path: Path) -> None:
    go, ran = tmp_path / "go", tmp_path / "ran"
    server.add_route(
        "/job",
        f"echo run >> {ran}; while [ ! -e {go} ]; do sleep 0.02; done",
        "--max-concurrency", "1", "--queue", "2",
    )  # fmt: skip
    first = Client(server.user + "/job")
    wait_for(lambda: states(server) == ["running"], what="the first handler")
    queued = Client(server.user + "/job")
    wait_for(lambda: sorted(states(server)) == ["queued", "running"], what="the second to queue")
    waiting = next(h for h in handlers(server) if h["state"] == "queued")
    assert waiting["pid"] is None
    assert server.kapow("handler", "kill", waiting["id"]).returncode == 0
    assert queued.status == 503
    go.touch()
    assert first.status == 200
    assert ran.read_text().split() == ["run"]


def test_the_control_api_serves_handlers_to_curl(server: KapowServer) -> None:
    listing = server.curl_control("-i", server.control + "/handlers")
    assert listing.stdout.startswith("HTTP/1.1 200 ") and listing.stdout.endswith("\n\n[]")
    assert "Content-Type: application/json" in listing.stdout
    for method in ("GET", "DELETE"):
        missing = server.curl_control("-i", "-X", method, server.control + "/handlers/nope")
        assert missing.stdout.startswith("HTTP/1.1 404 ")
        assert missing.stdout.endswith('{"reason": "Handler Not Found"}')


@pytest.mark.parametrize("extra", [(), ("--workers", "2")], ids=["one process", "two workers"])
def test_a_client_that_has_its_answer_finds_the_slot_free(start_server: Any, extra: tuple[str, ...]) -> None:
    # a route of one handler at a time and no queue: each request that follows
    # the last answer at once, on the same connection, is served, never refused
    server = start_server(extra=extra)
    server.add_route("/one", "echo hi | kapow set /response/body", "--max-concurrency", "1")
    url = server.user + "/one"
    done = curl("-s", "-w", "%{http_code} %{num_connects}\n", *["-o", "/dev/null", url] * 30)
    answers = done.stdout.split("\n")[:-1]
    assert [code for code, _ in map(str.split, answers)] == ["200"] * 30, done.stdout
    assert sum(int(connects) for _, connects in map(str.split, answers)) == 1  # all on one connection
