"""
Jobs (SPEC.md §12) on a real server, alone and with ``--workers 2``: 202 at
once, the states a client polls, the result replayed as the route would
have answered it, truncation, the route's own auth on the job's URLs, and
jobs waiting their turn past ``max_concurrency``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.kapowserver import KapowServer, curl, wait_for


@pytest.fixture(params=[(), ("--workers", "2")], ids=["one", "workers"])
def either(request: Any, start_server: Any) -> KapowServer:
    return start_server(extra=request.param)


def start_job(server: KapowServer, path: str, *args: str) -> str:
    result = curl("-s", "-D", "-", *args, server.user + path)
    head, _, body = result.stdout.partition("\n\n")
    assert head.startswith("HTTP/1.1 202"), result.stdout
    answer = json.loads(body)
    assert f"Location: /_jobs/{answer['id']}" in head.splitlines()
    assert answer == {"id": answer["id"], "status_url": f"/_jobs/{answer['id']}"}
    return answer["id"]


def status(server: KapowServer, job_id: str, *args: str) -> dict[str, Any]:
    return json.loads(curl("-s", *args, f"{server.user}/_jobs/{job_id}").stdout)


def done(server: KapowServer, job_id: str, *args: str) -> dict[str, Any]:
    return wait_for(
        lambda: (s := status(server, job_id, *args))["state"] == "done" and s, 15, "the job to end"
    )  # type: ignore[return-value]


def test_a_job_runs_and_its_result_is_kept(either: KapowServer, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    either.add_route(
        "/deploy/{env}",
        f"echo starting >&2; while [ ! -e {gate} ]; do sleep 0.05; done; "
        "kapow set /response/status 201; kapow set /response/headers/X-Env $(kapow get /request/matches/env); "
        "printf 'deployed %s\\n\\000end' \"$(kapow get /request/body)\" | kapow set /response/body; echo oops >&2; exit 2",
        "-X", "POST", "--job",
    )  # fmt: skip
    job_id = start_job(either, "/deploy/prod", "-d", "v1.2")
    running = status(either, job_id)
    assert (running["state"], running["id"], running["path"], running["job"]) == (
        "running",
        job_id,
        "/deploy/prod",
        True,
    )
    early = curl("-s", "-w", "\n%{http_code}", f"{either.user}/_jobs/{job_id}/result").stdout
    assert early == '{"reason": "Job Not Finished"}\n409'
    gate.touch()
    record = done(either, job_id)
    assert (record["status"], record["outcome"], record["exit_status"], record["bytes_in"]) == (
        201,
        "error",
        2,
        4,
    )
    assert (record["stderr_tail"], record["truncated"]) == ("starting\noops\n", False)
    result = curl("-s", "-i", f"{either.user}/_jobs/{job_id}/result")
    head, _, body = result.stdout.partition("\n\n")
    assert head.splitlines()[0] == "HTTP/1.1 201 Created"
    assert "X-Env: prod" in head.splitlines()
    assert body == "deployed v1.2\n\x00end"
    stored = wait_for(  # the history has it within a second
        lambda: (
            "id" in (r := json.loads(either.curl_control(f"{either.control}/history/{job_id}").stdout)) and r
        ),
        what="the stored record",
    )
    assert stored == {key: value for key, value in record.items() if key != "state"}


def test_a_long_result_is_cut_and_marked(start_server: Any) -> None:
    server = start_server(extra=("--job-output-max", "1K", "--workers", "2"))
    server.add_route("/big", "head -c 100000 /dev/zero | tr '\\0' x | kapow set /response/body", "--job")
    job_id = start_job(server, "/big")
    assert done(server, job_id)["truncated"] is True
    assert curl("-s", f"{server.user}/_jobs/{job_id}/result").stdout == "x" * 1024


def test_a_big_result_goes_whole_between_workers(start_server: Any) -> None:
    server = start_server(extra=("--workers", "2"))
    server.add_route("/big", "seq 1 40000 | kapow set /response/body", "--job")
    job_id = start_job(server, "/big")
    done(server, job_id)
    expected = "".join(f"{n}\n" for n in range(1, 40001))
    for _ in range(4):  # whichever worker answers
        assert curl("-s", f"{server.user}/_jobs/{job_id}/result").stdout == expected


def test_the_job_urls_need_the_routes_token(either: KapowServer, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    either.add_route(
        "/secret", "echo hidden | kapow set /response/body", "--job", "--auth-bearer", str(tokens)
    )
    assert curl("-s", "-o", "/dev/null", "-w", "%{http_code}", either.user + "/secret").stdout == "401"
    token = ("-H", "Authorization: Bearer s3cret")
    job_id = start_job(either, "/secret", *token)
    done(either, job_id, *token)
    for path in (f"/_jobs/{job_id}", f"/_jobs/{job_id}/result"):
        refused = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", either.user + path)
        assert refused.stdout == "401"
    assert curl("-s", *token, f"{either.user}/_jobs/{job_id}/result").stdout == "hidden\n"


def test_jobs_past_max_concurrency_wait_their_turn(either: KapowServer, tmp_path: Path) -> None:
    either.add_route(
        "/one",
        "sleep 0.4; echo $KAPOW_HANDLER_ID | kapow set /response/body",
        "--job",
        "--max-concurrency",
        "1",
        "--queue",
        "5",
    )
    either.add_route("/no-queue", "sleep 2", "--job", "--max-concurrency", "1")
    ids = [start_job(either, "/one") for _ in range(3)]
    states = [status(either, job_id)["state"] for job_id in ids]
    assert states[0] == "running" and states[1:] == ["queued", "queued"], states
    started = [done(either, job_id)["started"] for job_id in ids]
    assert started == sorted(started)
    for job_id in ids:
        assert curl("-s", f"{either.user}/_jobs/{job_id}/result").stdout == job_id + "\n"
    start_job(either, "/no-queue")
    busy = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", either.user + "/no-queue")
    assert busy.stdout == "503"


def test_a_jobs_timeout_ends_it(server: KapowServer) -> None:
    server.add_route("/slow", "sleep 30", "--job", "--timeout", "0.5")
    job_id = start_job(server, "/slow")
    record = done(server, job_id)
    assert (record["outcome"], record["status"]) == ("timeout", 504)
    result = curl("-s", "-w", "%{http_code}", f"{server.user}/_jobs/{job_id}/result")
    assert result.stdout == "Gateway Timeout\n504"


def test_unknown_jobs_and_the_path_before_the_routes(server: KapowServer) -> None:
    server.add_route("/_jobs/{x}", "echo route | kapow set /response/body")
    answer = curl("-s", "-w", "\n%{http_code}", server.user + "/_jobs/nope")
    assert answer.stdout == '{"reason": "Job Not Found"}\n404'
    assert curl("-s", "-w", "%{http_code}", server.user + "/_jobs/nope/other").stdout.endswith("404")


def test_a_job_outlives_a_restart_in_the_history_file(start_server: Any, tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite3"
    first = start_server(extra=("--history", str(db)))
    first.add_route("/j", "printf kept | kapow set /response/body", "--job")
    job_id = start_job(first, "/j")
    done(first, job_id)
    time.sleep(0.5)
    first.stop()
    second = start_server(extra=("--history", str(db), "--jobs-path", "/jobs"))
    second.add_route("/j", "true", "--job")
    # its route is there again, under a new id: the same method and pattern guard it
    assert curl("-s", f"{second.user}/jobs/{job_id}/result").stdout == "kept"
    assert json.loads(curl("-s", f"{second.user}/jobs/{job_id}").stdout)["state"] == "done"


def test_a_job_route_takes_no_streaming_mode(server: KapowServer) -> None:
    refused = server.kapow("route", "add", "--job", "--mode", "websocket", "/x", "-c", "cat")
    assert refused.returncode == 1
    assert refused.stderr.startswith("kapow: Invalid Route")
