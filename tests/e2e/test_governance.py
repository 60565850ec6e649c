"""
Governing handler processes, end to end: timeouts, client disconnects,
concurrency limits and the graceful stop leave nothing running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.kapowserver import KapowServer, curl, group_members, read_int, wait_for


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_handler_over_its_timeout_gets_504_and_its_whole_group_ends(
    server: KapowServer, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pgid"
    route = server.add_route(
        "/slow", f"echo $$ > {pidfile}; sleep 1000 & sleep 1000 & sleep 1000", "--timeout", "1"
    )
    assert route["timeout"] == 1
    started = time.monotonic()
    result = curl("-w", "%{http_code}", server.user + "/slow")
    pgid = read_int(pidfile)
    try:
        assert result.stdout == "Gateway Timeout\n504"
        assert time.monotonic() - started < 10
        match = server.wait_log(r"handler ([0-9a-f]{32}) of route (\S+) timed out after (\d+\.\d+)s")
        assert match.group(2) == route["id"] and 1.0 <= float(match.group(3)) < 5
        server.wait_log(rf'127\.0\.0\.1 {match.group(1)} - \[[^\]]+\] "GET /slow HTTP/1\.1" 504 ')
        wait_for(lambda: not group_members(pgid), what="the handler's process group to end")
    finally:
        kill_group(pgid)


def test_a_handler_that_ignores_sigterm_is_killed_after_the_grace_period(
    start_server, tmp_path: Path
) -> None:
    server = start_server(extra=("--handler-timeout", "0.5", "--kill-grace", "0.5"))
    pidfile = tmp_path / "pgid"
    server.add_route("/stubborn", f"trap '' TERM; echo $$ > {pidfile}; while :; do sleep 0.05; done")
    assert curl("-w", "%{http_code}", "-o", "/dev/null", server.user + "/stubborn").stdout == "504"
    pgid = read_int(pidfile)
    try:
        server.wait_log(rf"process group {pgid} outlived the grace period: SIGKILL")
        wait_for(lambda: not group_members(pgid), what="the stubborn group to end")
    finally:
        kill_group(pgid)


def test_a_streaming_response_over_its_timeout_is_cut(server: KapowServer, tmp_path: Path) -> None:
    pidfile = tmp_path / "pgid"
    server.add_route(
        "/partial",
        f"echo $$ > {pidfile}; echo partial | kapow set /response/stream; sleep 1000",
        "--timeout",
        "1",
    )
    result = curl(server.user + "/partial")
    kill_group(read_int(pidfile))
    server.wait_log(r'"GET /partial HTTP/1\.1" 200 \d+ ')
    assert result.stdout == "partial\n"
    assert result.returncode == 18  # curl: transfer closed with outstanding read data remaining


def test_a_client_that_hangs_up_ends_the_handler(server: KapowServer, tmp_path: Path) -> None:
    pidfile = tmp_path / "pgid"
    server.add_route("/hang", f"echo $$ > {pidfile}; sleep 1000 & wait")
    with socket.create_connection(server.user.removeprefix("http://").rsplit(":", 1)) as s:  # type: ignore[arg-type]
        s.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        pgid = read_int(pidfile)
    try:
        server.wait_log(r"client disconnected: ending its process group")
        server.wait_log(r'"GET /hang HTTP/1\.1" 499 0 ')
        wait_for(lambda: not group_members(pgid), what="the abandoned handler to end")
    finally:
        kill_group(pgid)


def test_fire_and_forget_routes_keep_running(server: KapowServer, tmp_path: Path) -> None:
    pidfile, go, finished = tmp_path / "pgid", tmp_path / "go", tmp_path / "finished"
    route = server.add_route(
        "/forget",
        f"echo $$ > {pidfile}; while [ ! -e {go} ]; do sleep 0.02; done; kapow get /request/body > {finished}",
        "-X", "POST", "--keep-running-on-disconnect",
    )  # fmt: skip
    assert route["keep_running_on_disconnect"] is True
    with socket.create_connection(server.user.removeprefix("http://").rsplit(":", 1)) as s:  # type: ignore[arg-type]
        s.sendall(b"POST /forget HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\npayload")
        pgid = read_int(pidfile)
    try:
        server.wait_log(r"client disconnected; the handler keeps running")
        assert group_members(pgid)
        go.touch()
        wait_for(
            lambda: finished.exists() and finished.read_bytes() == b"payload",
            what="the handler to read the body",
        )
    finally:
        kill_group(pgid)


def test_route_concurrency_limit_answers_503_at_once(server: KapowServer, tmp_path: Path) -> None:
    go = tmp_path / "go"
    route = server.add_route(
        "/limited",
        f"touch {tmp_path}/started-$$; while [ ! -e {go} ]; do sleep 0.02; done; echo ok | kapow set /response/body",
        "--max-concurrency",
        "2",
    )
    assert route["max_concurrency"] == 2

    def request(_: int) -> tuple[str, float]:
        started = time.monotonic()
        result = curl("-D", "-", "-w", "%{http_code}", server.user + "/limited")
        return result.stdout, time.monotonic() - started

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(request, n) for n in range(5)]
        wait_for(lambda: sum(f.done() for f in futures) == 3, what="three refusals")
        wait_for(lambda: len(list(tmp_path.glob("started-*"))) == 2, what="two handlers")
        assert sum(f.done() for f in futures) == 3
        refused = [f.result() for f in futures if f.done()]
        go.touch()
        results = [f.result()[0] for f in futures]
    assert sum(r.endswith("ok\n200") for r in results) == 2
    assert sum(r.endswith("503") for r in results) == 3
    assert all("Retry-After: 1" in out for out, _ in refused)
    assert len(list(tmp_path.glob("started-*"))) == 2


def test_server_wide_handler_limit(start_server, tmp_path: Path) -> None:
    server = start_server(extra=("--max-handlers", "1"))
    go = tmp_path / "go"
    server.add_route("/a", f"touch {tmp_path}/started; while [ ! -e {go} ]; do sleep 0.02; done")
    server.add_route("/b", "echo b | kapow set /response/body")
    first = subprocess.Popen(["curl", "-s", server.user + "/a"])
    wait_for((tmp_path / "started").exists, what="the first handler")
    assert curl("-w", "%{http_code}", "-o", "/dev/null", server.user + "/b").stdout == "503"
    health = json.loads(server.curl_control(server.control + "/health").stdout)
    assert health == {"status": "ok", "routes": 2, "handlers": 1}
    go.touch()
    first.wait(10)
    wait_for(lambda: curl(server.user + "/b").stdout == "b\n", what="capacity to come back")


def test_sigterm_lets_running_handlers_finish_and_exits_0(server: KapowServer, tmp_path: Path) -> None:
    pidfile = tmp_path / "pgid"
    server.add_route(
        "/two-seconds",
        f"echo $$ > {pidfile}; sleep 1000 & sleep 2; echo finished | kapow set /response/body",
    )
    request = subprocess.Popen(["curl", "-sS", server.user + "/two-seconds"], stdout=subprocess.PIPE)
    pgid = read_int(pidfile)
    try:
        server.process.send_signal(signal.SIGTERM)
        server.wait_log(r"stopping gracefully")
        refused = curl("--max-time", "5", server.user + "/two-seconds")
        assert refused.returncode == 7  # the user interface no longer accepts connections
        out, _ = request.communicate(timeout=20)
        assert out == b"finished\n"
        assert server.process.wait(20) == 0
        assert not group_members(pgid)
    finally:
        kill_group(pgid)


def test_a_second_signal_stops_at_once(start_server, tmp_path: Path) -> None:
    server = start_server(extra=("--shutdown-timeout", "600"))
    pidfile = tmp_path / "pgid"
    server.add_route("/forever", f"echo $$ > {pidfile}; trap '' TERM; while :; do sleep 0.05; done")
    request = subprocess.Popen(["curl", "-s", server.user + "/forever"], stdout=subprocess.DEVNULL)
    pgid = read_int(pidfile)
    try:
        server.process.send_signal(signal.SIGINT)
        server.wait_log(r"waiting up to 600\.0s for 1 running handlers")
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(15) == 0
        assert time.monotonic() - started < 10
        assert not group_members(pgid)
    finally:
        kill_group(pgid)
        request.kill()
        request.wait()


def test_no_new_handlers_start_once_a_stop_began(server: KapowServer, tmp_path: Path) -> None:
    pidfile = tmp_path / "pgid"
    server.add_route("/slow", f"echo $$ > {pidfile}; sleep 2")
    server.add_route("/fast", "echo fast | kapow set /response/body")
    host, port = server.user.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as kept:
        kept.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b"0\r\n\r\n"):
            first += kept.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        slow = subprocess.Popen(["curl", "-s", server.user + "/slow"], stdout=subprocess.DEVNULL)
        pgid = read_int(pidfile)
        try:
            server.process.send_signal(signal.SIGTERM)
            server.wait_log(r"stopping gracefully")
            kept.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = kept.recv(4096)
            assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
            slow.wait(20)
            assert server.process.wait(20) == 0
        finally:
            kill_group(pgid)
