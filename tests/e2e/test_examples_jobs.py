"""
examples/deploy-job.pow and examples/poll_job.py (docs/howto/jobs.rst) on a
real server: a deploy started with the route's bearer token, polled until
done, its result and its record; deploys waiting their turn; the token file
the init program makes, keeps or refuses; and the how-to's treq program run
for real.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.kapowserver import KapowServer, curl, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def start_deploy_job(start_server: Any, tokens: Path, status: int = 0) -> KapowServer:
    """A server running examples/deploy-job.pow, once its init program has ended with ``status``."""
    program = EXAMPLES / "deploy-job.pow"
    assert os.access(program, os.X_OK), f"{program} must be executable"
    env = {**os.environ, "DEPLOY_TOKENS_FILE": str(tokens), "DEPLOY_STEP_SECONDS": "0.1"}
    server = start_server(str(program), env=env)
    server.wait_log(rf"deploy-job\.pow exited with status {status}$")
    return server


def answer(*args: str) -> tuple[int, dict[str, str], str]:
    """One request with curl: status, headers (lower-case names) and body."""
    result = curl("-D", "-", *args)
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.replace("\r\n", "\n").partition("\n\n")
    status_line, *lines = head.split("\n")
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)
    }
    return int(status_line.split()[1]), headers, body


def test_a_deploy_job_with_its_token(start_server: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "deploy.tokens"
    server = start_deploy_job(start_server, tokens)
    # the token file is made, closed to others, and its token logged once
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    token = tokens.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", token), token
    assert sum(f"new deploy token in {tokens}: {token}" in line for line in server.lines) == 1
    auth = ("-H", f"Authorization: Bearer {token}")

    assert answer("-d", "v1.4.2", server.user + "/deploy/staging")[0] == 401  # no token, no job
    code, headers, body = answer(*auth, "-d", "v1.4.2", server.user + "/deploy/staging")
    assert code == 202
    job = json.loads(body)
    assert job == {"id": job["id"], "status_url": f"/_jobs/{job['id']}"}
    assert headers["location"] == job["status_url"]
    status_url = server.user + job["status_url"]

    # the job's URLs need the route's token
    for url in (status_url, status_url + "/result"):
        code, headers, _ = answer(url)
        assert (code, headers.get("www-authenticate")) == (401, "Bearer")

    def record() -> dict[str, Any]:
        code, _, body = answer(*auth, status_url)
        assert code == 200, body
        return json.loads(body)

    assert record()["state"] in ("running", "done")
    done = wait_for(lambda: (r := record())["state"] == "done" and r, 20, "the deploy to end")
    assert isinstance(done, dict)
    assert (done["id"], done["job"], done["path"]) == (job["id"], True, "/deploy/staging")
    assert (done["status"], done["outcome"], done["exit_status"], done["truncated"]) == (201, "ok", 0, False)
    assert done["stderr_tail"] == (
        "deploying v1.4.2 to staging\nfetch...\nbuild...\nmigrate...\nswitch...\ndeployed v1.4.2 to staging\n"
    )
    code, headers, body = answer(*auth, status_url + "/result")
    assert (code, headers["content-type"]) == (201, "application/json")
    assert json.loads(body) == {"env": "staging", "version": "v1.4.2", "deployed": True}

    # a version that is not one: the job ends with the deploy's own refusal as its result
    bad = json.loads(answer(*auth, "-d", "not a version", server.user + "/deploy/prod")[2])
    bad_url = server.user + bad["status_url"]
    wait_for(lambda: json.loads(answer(*auth, bad_url)[2])["state"] == "done", 20, "the refused deploy")
    code, _, body = answer(*auth, bad_url + "/result")
    assert (code, json.loads(body)) == (422, {"error": "the body must be a version: letters, digits, . _ -"})
    assert json.loads(answer(*auth, bad_url)[2])["outcome"] == "error"


def test_deploys_wait_their_turn(start_server: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "deploy.tokens"
    server = start_deploy_job(start_server, tokens)
    auth = ("-H", f"Authorization: Bearer {tokens.read_text().strip()}")
    ids = [json.loads(answer(*auth, "-d", f"v{n}", server.user + "/deploy/prod")[2])["id"] for n in (1, 2)]
    states = [json.loads(answer(*auth, f"{server.user}/_jobs/{job_id}")[2])["state"] for job_id in ids]
    assert states == ["running", "queued"]

    def done(job_id: str) -> bool:
        return json.loads(answer(*auth, f"{server.user}/_jobs/{job_id}")[2])["state"] == "done"

    wait_for(lambda: all(map(done, ids)), 20, "the deploys")
    results = [json.loads(answer(*auth, f"{server.user}/_jobs/{job_id}/result")[2]) for job_id in ids]
    assert [result["version"] for result in results] == ["v1", "v2"]


def test_a_token_file_of_ones_own_is_kept(start_server: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "deploy.tokens"
    tokens.write_text("my-ci-token\n")
    tokens.chmod(0o600)
    server = start_deploy_job(start_server, tokens)
    assert tokens.read_text() == "my-ci-token\n"
    assert not any("new deploy token" in line for line in server.lines)
    code, _, _ = answer(
        "-H", "Authorization: Bearer my-ci-token", "-d", "v1", server.user + "/deploy/staging"
    )
    assert code == 202


def test_a_token_file_others_may_write_is_refused(start_server: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "deploy.tokens"
    tokens.write_text("anyone-could-add-a-line\n")
    tokens.chmod(0o662)
    server = start_deploy_job(start_server, tokens, status=1)
    server.wait_log("not a token file of this user's own")
    assert server.kapow("route", "list").stdout == "[]\n"


def test_the_poll_job_example(start_server: Any, tmp_path: Path) -> None:
    """docs/howto/jobs.rst's treq program: starts a deploy, follows it to done, prints its result."""
    tokens = tmp_path / "deploy.tokens"
    server = start_deploy_job(start_server, tokens)
    env = {**os.environ, "DEPLOY_TOKEN": tokens.read_text().strip()}

    def poll(version: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(EXAMPLES / "poll_job.py"), server.user + "/deploy/staging", version],
            capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    ran = poll("v2.0.0")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout) == {"env": "staging", "version": "v2.0.0", "deployed": True}
    lines = ran.stderr.splitlines()
    assert re.fullmatch(r"job [0-9a-f]{32}", lines[0]), lines
    states = lines[1 : lines.index("done") + 1]  # as often as it polled: each change once, in order
    assert states in (["done"], ["running", "done"], ["queued", "running", "done"]), lines
    assert "  | deployed v2.0.0 to staging" in lines
    assert lines[-1] == "result: 201 Created"

    refused = poll("not a version")
    assert refused.returncode == 1, refused.stderr
    assert json.loads(refused.stdout) == {"error": "the body must be a version: letters, digits, . _ -"}

    env["DEPLOY_TOKEN"] = "wrong"
    unauthorized = poll("v2.0.1")
    assert unauthorized.returncode == 1
    assert unauthorized.stderr.strip().endswith("answered 401: Unauthorized"), unauthorized.stderr
