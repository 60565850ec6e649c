"""
``kapow server --workers 2``, end to end: two worker processes serve the user
interface on the socket the main process opened, see every route change,
share route limits exactly, are counted by ``/health``, are replaced when
they die, and leave nothing behind when the server stops.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.kapowserver import KapowServer, curl, group_members, wait_for

WORKERS = ("--workers", "2")


def worker_pids(server: KapowServer) -> dict[int, int]:
    """Worker number -> pid of the workers started so far (the latest of each number)."""
    found: dict[int, int] = {}
    for line in list(server.lines):
        m = re.search(r"worker (\d+) started \(pid (\d+)\)", line)
        if m:
            found[int(m.group(1))] = int(m.group(2))
    return found


def serving(server: KapowServer, count: int = 2) -> dict[int, int]:
    """Wait until ``count`` workers serve; return their pids."""
    wait_for(
        lambda: len(re.findall(r"worker \d+ serves \(", server.output())) >= count, 20, "the workers to serve"
    )
    return worker_pids(server)


def many(url: str, n: int) -> list[tuple[str, str]]:
    """``n`` GETs of ``url``, each on a connection of its own, from one curl: (body, status) of each."""
    result = curl("-H", "Connection: close", "-w", "##%{http_code}\n", *[url] * n)
    return re.findall(r"(.*?)##(\d{3})\n", result.stdout, re.DOTALL)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_a_route_added_after_start_is_served_by_both_workers(start_server) -> None:
    server = start_server(extra=WORKERS)
    pids = serving(server)
    server.add_route("/who", 'printf %s "$PPID" | kapow set /response/body')
    seen: set[int] = set()
    for _ in range(10):  # the kernel picks the accepting worker: a few rounds until both answered
        answers = many(server.user + "/who", 20)
        assert len(answers) == 20 and {code for _, code in answers} == {"200"}, answers
        seen |= {int(pid) for pid, _ in answers}
        if len(seen) == 2:
            break
    assert seen == set(pids.values())
    server.wait_log(r'127\.0\.0\.1 [0-9a-f]{32} - \[[^\]]+\] "GET /who HTTP/1\.1" 200 ')


def test_a_route_limited_to_one_never_runs_twice_at_once(start_server, tmp_path: Path) -> None:
    server = start_server(extra=WORKERS)
    pids = serving(server)
    lock, overlaps, ran = tmp_path / "lock", tmp_path / "overlaps", tmp_path / "ran"
    server.add_route(
        "/one",
        f"mkdir {lock} || echo overlap >> {overlaps}; echo $PPID >> {ran}; sleep 0.1; rmdir {lock}",
        "--max-concurrency", "1",
    )  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):  # bursts until both workers ran it (the kernel picks who accepts)
            rounds = list(pool.map(lambda _: many(server.user + "/one", 4), range(8)))
            codes = [code for r in rounds for _, code in r]
            assert len(codes) == 32 and set(codes) == {"200", "503"}, codes
            assert not overlaps.exists()
            if {int(pid) for pid in ran.read_text().split()} == set(pids.values()):
                break
    assert {int(pid) for pid in ran.read_text().split()} == set(pids.values())


def test_max_handlers_holds_across_workers(start_server, tmp_path: Path) -> None:
    server = start_server(extra=(*WORKERS, "--max-handlers", "1"))
    serving(server)
    go = tmp_path / "go"
    server.add_route("/a", f"touch {tmp_path}/started; while [ ! -e {go} ]; do sleep 0.02; done")
    server.add_route("/b", "kapow set /response/body b")
    first = subprocess.Popen(["curl", "-s", server.user + "/a"], stdout=subprocess.DEVNULL)
    try:
        wait_for((tmp_path / "started").exists, what="the first handler")
        assert {code for _, code in many(server.user + "/b", 10)} == {"503"}  # from either worker
    finally:
        go.touch()
        first.wait(10)
    wait_for(lambda: curl(server.user + "/b").stdout == "b", what="capacity to come back")
    assert {answer for answer in many(server.user + "/b", 10)} == {("b", "200")}


def test_health_counts_the_handlers_of_both_workers(start_server, tmp_path: Path) -> None:
    server = start_server(extra=WORKERS)
    pids = serving(server)
    go, started = tmp_path / "go", tmp_path / "started"
    started.mkdir()
    server.add_route("/wait", f'echo "$PPID" > {started}/$$; while [ ! -e {go} ]; do sleep 0.02; done')
    requests: list[subprocess.Popen] = []
    try:
        for _ in range(40):  # until both workers run one
            requests.append(
                subprocess.Popen(["curl", "-s", server.user + "/wait"], stdout=subprocess.DEVNULL)
            )
            wait_for(lambda: len(list(started.iterdir())) == len(requests), what="the handler to start")
            if {int(p.read_text()) for p in started.iterdir()} == set(pids.values()):
                break
        assert {int(p.read_text()) for p in started.iterdir()} == set(pids.values())
        health = json.loads(server.curl_control(server.control + "/health").stdout)
        assert health == {"status": "ok", "routes": 1, "handlers": len(requests), "workers": 2}
    finally:
        go.touch()
        for request in requests:
            request.wait(10)


def test_a_killed_worker_is_replaced_and_its_requests_fail_cleanly(start_server, tmp_path: Path) -> None:
    server = start_server(extra=WORKERS)
    pids = serving(server)
    started = tmp_path / "started"
    started.mkdir()
    server.add_route("/hang", f'echo "$PPID" > {started}/$$; sleep 30')
    server.add_route("/who", 'printf %s "$PPID" | kapow set /response/body')
    requests: list[subprocess.Popen] = []
    victim = None
    try:
        for _ in range(40):  # until a request runs on worker 1
            before = set(started.iterdir())
            requests.append(subprocess.Popen(["curl", "-sS", server.user + "/hang"], stderr=subprocess.PIPE))
            wait_for(lambda: len(list(started.iterdir())) == len(requests), what="the handler to start")
            (new,) = set(started.iterdir()) - before
            if int(wait_for(lambda n=new: n.read_text().strip(), what="its parent")) == pids[1]:  # type: ignore[misc]
                victim = requests[-1]
                break
        assert victim is not None
        os.kill(pids[1], signal.SIGKILL)
        victim.wait(10)  # its connection closes: no answer, no hang
        assert victim.returncode != 0
        server.wait_log(rf"worker 1 \(pid {pids[1]}\) ended .*: starting another")
        server.wait_log(r"worker 1 left 1 handlers running: ending their process groups")
        on_worker_1 = [int(p.name) for p in started.iterdir() if int(p.read_text()) == pids[1]]
        wait_for(lambda: not any(group_members(g) for g in on_worker_1), what="its handlers to end")
        assert all(group_members(int(p.name)) for p in started.iterdir() if int(p.read_text()) == pids[2])
        wait_for(lambda: worker_pids(server)[1] != pids[1], what="a new worker 1")
        serving(server, 3)
        answers = many(server.user + "/who", 20)
        assert len(answers) == 20 and {code for _, code in answers} == {"200"}, answers
        assert {int(pid) for pid, _ in answers} <= {pids[2], worker_pids(server)[1]}
    finally:
        for request in requests:
            request.kill()
            request.wait()
        for handler in started.iterdir():
            try:
                os.killpg(int(handler.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_graceful_stop_drains_every_worker_and_leaves_no_process(
    start_server, tmp_path: Path, sig: signal.Signals
) -> None:
    server = start_server(extra=WORKERS)
    pids = serving(server)
    started = tmp_path / "started"
    started.mkdir()
    server.add_route("/slow", f"echo $$ > {started}/$$; sleep 1; echo finished | kapow set /response/body")
    requests = [
        subprocess.Popen(["curl", "-s", server.user + "/slow"], stdout=subprocess.PIPE) for _ in range(4)
    ]
    wait_for(lambda: len(list(started.iterdir())) == 4, what="four handlers")
    server.process.send_signal(sig)
    assert [r.communicate(timeout=20)[0] for r in requests] == [b"finished\n"] * 4
    assert server.process.wait(20) == 0
    assert not any(alive(pid) for pid in pids.values())
    assert not any(group_members(int(p.name)) for p in started.iterdir())
    assert "worker 1 stopped" in server.output() and "worker 2 stopped" in server.output()


def test_the_data_bind_reaches_the_handlers_of_every_worker(start_server, tmp_path: Path) -> None:
    server = start_server(extra=WORKERS)
    pids = serving(server)
    go, started = tmp_path / "go", tmp_path / "started"
    started.mkdir()
    # the handler itself writes through --data-bind: appending PUTs, streamed
    server.add_route(
        "/held/{n}",
        f'echo "$PPID" > {started}/$KAPOW_HANDLER_ID; export KAPOW_DATA_URL={server.data}; '
        "echo first | kapow set /response/stream; "
        f"while [ ! -e {go} ]; do sleep 0.02; done; echo last | kapow set /response/stream",
    )
    requests: dict[str, subprocess.Popen] = {}
    try:
        for n in range(40):  # until both workers run one
            requests[str(n)] = subprocess.Popen(
                ["curl", "-sSN", f"{server.user}/held/{n}"], stdout=subprocess.PIPE
            )
            out = requests[str(n)].stdout
            assert select.select([out], [], [], 10)[0], "no first line within 10s"
            assert out.readline() == b"first\n"  # type: ignore[union-attr]
            if {int(p.read_text()) for p in started.iterdir()} == set(pids.values()):
                break
        assert {int(p.read_text()) for p in started.iterdir()} == set(pids.values())
        for handler in started.iterdir():
            n = curl(f"{server.data}/handlers/{handler.name}/request/matches/n").stdout
            put = curl(
                "-X", "PUT", "--data-binary", f"{n} via the main process\n", "-w", "%{http_code}",
                f"{server.data}/handlers/{handler.name}/response/body",
            )  # fmt: skip
            assert put.stdout == "200"
            bad = curl("-i", f"{server.data}/handlers/{handler.name}/nope")  # errors pass through as they are
            assert bad.stdout.startswith("HTTP/1.1 400 ")
            body = (
                '{"reason": "Invalid Resource Path", "detail": "\'/nope\' is not a resource of the data API"}'
            )
            assert f"\nContent-Length: {len(body)}\n" in bad.stdout  # text mode: CRLF reads as LF
            assert bad.stdout.endswith("\n\n" + body)
        gone = curl("-w", " %{http_code}", f"{server.data}/handlers/0001{'0' * 28}/request/path")
        assert gone.stdout == '{"reason": "Handler ID Not Found"} 404'
        go.touch()
        answers = {n: r.communicate(timeout=20)[0] for n, r in requests.items()}
        for n, answer in answers.items():
            assert answer == f"{n} via the main process\nlast\n".encode(), answers
    finally:
        go.touch()
        for request in requests.values():
            request.kill()
            request.wait()


def listed(server: KapowServer) -> list[dict]:
    result = server.kapow("handler", "list")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def worker_of(handler: dict) -> int:
    return int(handler["id"][:4], 16)


def test_one_queue_for_the_whole_server_first_come_first_served(start_server, tmp_path: Path) -> None:
    server = start_server(extra=WORKERS)
    serving(server)
    go, log = tmp_path / "go", tmp_path / "log"
    server.add_route(
        "/deploy",
        f'n=$(kapow get /request/params/n); echo "start $n" >> {log};'
        f' while [ ! -e {go} ]; do sleep 0.02; done; echo "end $n" >> {log}',
        "--max-concurrency", "1", "--queue", "30",
    )  # fmt: skip
    requests: list[subprocess.Popen] = []
    try:
        for n in range(30):  # one at a time, each in before the next, until both workers hold some
            requests.append(
                subprocess.Popen(
                    ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{server.user}/deploy?n={n}"],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            wait_for(lambda: len(listed(server)) == len(requests), what=f"request {n} to arrive")
            handlers = listed(server)
            if len(requests) >= 4 and {worker_of(h) for h in handlers} == {1, 2}:
                break
        assert {worker_of(h) for h in handlers} == {1, 2}
        assert sorted(h["state"] for h in handlers) == ["queued"] * (len(requests) - 1) + ["running"]
    finally:
        go.touch()
        codes = [request.communicate(timeout=30)[0] for request in requests]
    assert codes == ["200"] * len(requests)
    assert log.read_text().split("\n") == [
        f"{what} {n}" for n in range(len(requests)) for what in ("start", "end")
    ] + [""]


def test_the_handler_list_covers_every_worker_and_kill_reaches_the_right_one(
    start_server, tmp_path: Path
) -> None:
    server = start_server(extra=WORKERS)
    serving(server)
    started = tmp_path / "started"
    started.mkdir()
    server.add_route("/hold", f"echo $$ > {started}/$$; kapow set /response/body held; sleep 1000 & wait")
    requests: list[subprocess.Popen] = []
    try:
        for _ in range(40):  # until both workers run one
            requests.append(subprocess.Popen(["curl", "-s", server.user + "/hold"], stdout=subprocess.PIPE))
            wait_for(lambda: len(listed(server)) == len(requests), what="the handler to start")
            if {worker_of(h) for h in listed(server)} == {1, 2}:
                break
        handlers = listed(server)
        assert {worker_of(h) for h in handlers} == {1, 2}
        assert {h["pid"] for h in handlers} == {int(p.name) for p in started.iterdir()}
        for number in (2, 1):
            victim = next(h for h in handlers if worker_of(h) == number)
            shown = server.kapow("handler", "get", victim["id"])
            assert json.loads(shown.stdout)["pid"] == victim["pid"]
            assert server.kapow("handler", "kill", victim["id"]).returncode == 0
            wait_for(
                lambda pid=victim["pid"]: not group_members(pid), what="the killed handler's group to end"
            )
            assert victim["id"] not in {h["id"] for h in listed(server)}
            gone = server.kapow("handler", "kill", victim["id"])
            assert (gone.returncode, gone.stderr) == (1, "kapow: Handler Not Found\n")
        assert len(listed(server)) == len(requests) - 2
    finally:
        for h in listed(server):
            server.kapow("handler", "kill", h["id"])
        bodies = [request.communicate(timeout=30)[0] for request in requests]
    assert bodies == [b"held"] * len(requests)  # each response completed as at exit
