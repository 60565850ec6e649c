"""
History and jobs shared by a cluster (SPEC.md §12, "Shared by a cluster"):
two real servers keeping their history in one real PostgreSQL (a throwaway
cluster of :mod:`tests.support.postgres`), nginx in front, a job started
and polled through it; and an outage of the database under a running server.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.kapowserver import KAPOW, KapowServer, curl, wait_for, write_program
from tests.support.nginx import NGINX, Nginx, hostport
from tests.support.postgres import Postgres, postgres  # noqa: F401  (the fixture)

INIT = """#!/bin/sh
kapow route add /where -c 'echo {name} | kapow set /response/body'
kapow route add -X POST --job --auth-bearer "$TOKENS" /deploy -c 'sleep 0.3; echo "deployed by {name}" | kapow set /response/body'
"""


def history(server: KapowServer, query: str = "") -> list[dict[str, Any]]:
    return json.loads(server.curl_control(server.control + "/history" + query).stdout)


@pytest.fixture
def database(postgres: Postgres) -> str:  # noqa: F811  (the fixture's name)
    return postgres.new_database()


def test_two_servers_share_history_and_jobs(start_server: Any, database: str, tmp_path: Path) -> None:
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    tokens = tmp_path / "tokens"
    tokens.write_text("t0ken\n")
    servers = []
    for name in ("alpha", "beta"):
        init = write_program(tmp_path / f"{name}.pow", INIT.format(name=name))
        server = start_server(
            init,
            extra=("--history", database, "--server-name", name),
            env={**os.environ, "TOKENS": str(tokens)},
        )
        server.wait_log(rf"{name}\.pow exited with status 0")
        servers.append(server)
    proxy = Nginx([hostport(s.user) for s in servers])
    try:
        seen = {curl("-s", proxy.url + "/where").stdout.strip() for _ in range(8)}
        assert seen == {"alpha", "beta"}
        for server in servers:  # each lists the runs of both
            wait_for(lambda s=server: len(history(s)) == 8, what="eight records on each server")
            assert {r["server"] for r in history(server)} == {"alpha", "beta"}
        token = ("-H", "Authorization: Bearer t0ken")
        started = curl("-s", "-X", "POST", *token, proxy.url + "/deploy")
        job = json.loads(started.stdout)
        # every server knows of it within a second (the history's write): a 404 before may come from another
        polled = wait_for(
            lambda: (
                (s := json.loads(curl("-s", *token, proxy.url + job["status_url"]).stdout)).get("state")
                == "done"
                and s
            ),
            15,
            "the job to end, polled through the balancer",
        )
        assert polled["job"] is True and "_guard" not in polled
        result = f"deployed by {polled['server']}\n"
        for (
            server
        ) in servers:  # every server answers for it (within a second), with the guard kept with the job
            wait_for(
                lambda s=server: curl("-s", *token, s.user + job["status_url"] + "/result").stdout == result,
                what="every server to have the result",
            )
            refused = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", server.user + job["status_url"])
            assert refused.stdout == "401"
        table = servers[0].kapow("history", "--limit", "20")
        assert table.returncode == 0 and job["id"] in table.stdout
    finally:
        proxy.stop()


def test_an_outage_is_served_through_and_nothing_is_lost(
    start_server: Any,
    postgres: Postgres,  # noqa: F811
    database: str,
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("t0ken\n")
    init = write_program(tmp_path / "one.pow", INIT.format(name="one"))
    server = start_server(init, extra=("--history", database), env={**os.environ, "TOKENS": str(tokens)})
    server.wait_log(r"one\.pow exited with status 0")
    token = ("-H", "Authorization: Bearer t0ken")
    curl("-s", server.user + "/where")
    wait_for(lambda: len(history(server)) == 1, what="the first record")
    postgres.stop()
    try:
        for _ in range(5):
            assert curl("-s", server.user + "/where").stdout == "one\n"
        health = wait_for(
            lambda: (
                (h := json.loads(server.curl_control(server.control + "/health").stdout)).get("history") and h
            ),
            10,
            "health to say so",
        )
        assert health["history"] == "unavailable"
        asked = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", *token, server.user + "/_jobs/unknown")
        assert asked.stdout == "503"
        listed = server.curl_control("-w", "\n%{http_code}", server.control + "/history")
        assert listed.stdout == '{"reason": "History Unavailable"}\n503'
        assert server.kapow("history").stderr.strip() == "kapow: History Unavailable"
    finally:
        postgres.start()
    wait_for(lambda: len(history(server, "?limit=100")) == 6, 20, "the waiting records, once each")
    wait_for(
        lambda: "history" not in json.loads(server.curl_control(server.control + "/health").stdout),
        10,
        "health to be whole again",
    )
    ids = [r["id"] for r in history(server, "?limit=100")]
    assert len(ids) == len(set(ids)) == 6


@pytest.mark.parametrize(
    "uri",
    ["postgresql://kapow@127.0.0.1:1/nowhere", "postgresql://[not a uri"],
    ids=["unreachable", "malformed"],
)
def test_a_database_out_of_reach_at_start_is_a_one_line_error(uri: str) -> None:
    result = subprocess.run(
        [KAPOW, "server", "--bind", "127.0.0.1:0", "--control-bind", "127.0.0.1:0", "--data-bind", "127.0.0.1:0",
         "--history", uri],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--history" in result.stderr
