"""
Resource limits of handlers, end to end: each limit shown by a real handler
that runs into it, in force from the start and in every child, the
server's defaults under the routes' own values, and routes without limits
unaffected.
"""

from __future__ import annotations

import os
import random
import shlex
import sys
from typing import Any

import pytest

from tests.support.kapowserver import KapowServer, curl


@pytest.fixture(params=[(), ("--workers", "2")], ids=["one-worker", "two-workers"])
def limited_server(request: pytest.FixtureRequest, start_server: Any) -> KapowServer:
    """A server alone and with two workers, with the native client where it
    was built (else prlimit; tests/e2e/test_spawn.py runs both)."""
    return start_server(extra=request.param)


def body(server: KapowServer, path: str) -> str:
    result = curl("-w", "\n%{http_code}", server.user + path)
    text, _, code = result.stdout.rpartition("\n")
    assert code == "200", result.stdout
    return text


def test_memory_stops_a_handler_that_allocates_past_it_and_not_another_route(
    limited_server: KapowServer,
) -> None:
    allocate = f"{shlex.quote(sys.executable)} -c 'b = bytearray(10**9)' 2>/dev/null; echo $? | kapow set /response/body"
    limited = limited_server.add_route("/small", allocate, "--limit", "memory=256M")
    assert limited["limits"] == {"memory": 256 << 20}
    limited_server.add_route("/big", allocate)
    assert body(limited_server, "/small") == "1\n"  # MemoryError
    assert body(limited_server, "/big") == "0\n"


def test_cpu_ends_a_busy_loop(limited_server: KapowServer) -> None:
    limited_server.add_route("/spin", "while :; do :; done", "--limit", "cpu=1")
    assert body(limited_server, "/spin") == ""
    limited_server.wait_log(r"handler [0-9a-f]{32} killed by signal 24 ")  # SIGXCPU


def test_open_files(limited_server: KapowServer) -> None:
    script = (
        "import os\nn = 0\ntry:\n    while True:\n        os.open('/dev/null', os.O_RDONLY)\n        n += 1\n"
        "except OSError as e:\n    print(n, e.strerror)"
    )
    limited_server.add_route(
        "/files", f"{shlex.quote(sys.executable)} -c {shlex.quote(script)} | kapow set /response/body",
        "--limit", "open_files=16",
    )  # fmt: skip
    opened, why = body(limited_server, "/files").split(" ", 1)
    assert why == "Too many open files\n"
    assert 0 < int(opened) < 16


def test_file_size(limited_server: KapowServer, tmp_path) -> None:
    out = tmp_path / "out"
    limited_server.add_route(
        "/write",
        f"head -c 4096 /dev/zero > {out}; echo $? | kapow set /response/body",
        "--limit",
        "file_size=1K",
    )
    assert body(limited_server, "/write") == "153\n"  # head got SIGXFSZ (128 + 25)
    assert out.stat().st_size == 1024


def test_processes(limited_server: KapowServer) -> None:
    # RLIMIT_NPROC counts the processes of the handler's user and does not
    # bind root: as root, the handler becomes a user of its own first
    script = (
        "import os, time, urllib.request\nn = 0\nchildren = []\nwhy = ''\ntry:\n"
        "    for _ in range(10):\n        pid = os.fork()\n        if pid == 0:\n"
        "            time.sleep(5)\n            os._exit(0)\n        children.append(pid)\n        n += 1\n"
        "except OSError as e:\n    why = e.strerror\nfor pid in children:\n    os.kill(pid, 9)\n"
        "url = os.environ['KAPOW_DATA_URL'] + '/handlers/' + os.environ['KAPOW_HANDLER_ID'] + '/response/body'\n"
        "urllib.request.urlopen(urllib.request.Request(url, data=f'{n} {why}'.encode(), method='PUT'))\n"
    )
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    entrypoint = f"{python} -I -c"
    if os.geteuid() == 0:
        uid = random.randrange(40_000, 60_000)
        entrypoint = f"setpriv --reuid={uid} --regid={uid} --clear-groups {entrypoint}"
    limited_server.add_route("/fork", script, "-e", entrypoint, "--limit", "processes=3")
    started, why = body(limited_server, "/fork").split(" ", 1)
    assert why == "Resource temporarily unavailable"
    assert int(started) <= 2


def test_a_handler_that_forks_at_once_inherits_the_limits(limited_server: KapowServer) -> None:
    limited_server.add_route(
        "/child",
        "(grep -E '^Max (open files|address space)' /proc/self/limits) | kapow set /response/body",
        "--limit", "memory=1G", "--limit", "open_files=77",
    )  # fmt: skip
    lines = [line.split()[:5] for line in body(limited_server, "/child").splitlines()]
    assert lines == [
        ["Max", "open", "files", "77", "77"],
        ["Max", "address", "space", str(1 << 30), str(1 << 30)],
    ]


def test_a_limited_route_whose_program_cannot_run_gets_500(limited_server: KapowServer) -> None:
    limited_server.add_route("/missing", "", "-e", "/nonexistent/program", "--limit", "cpu=5")
    result = curl("-w", "%{http_code}", "-o", "/dev/null", limited_server.user + "/missing")
    assert result.stdout == "500"
    limited_server.wait_log(r"cannot start: cannot run /nonexistent/program")


def test_server_defaults_and_a_routes_own_value(start_server) -> None:
    server = start_server(extra=("--limit", "open_files=40", "--limit", "cpu=100"))
    show = "grep -E '^Max (open files|cpu time)' /proc/self/limits | kapow set /response/body"
    server.add_route("/default", show)
    server.add_route("/own", show, "--limit", "open_files=20")

    def limits(path: str) -> list[list[str]]:
        return [line.split()[-3:-1] for line in body(server, path).splitlines()]

    assert limits("/default") == [["100", "101"], ["40", "40"]]
    assert limits("/own") == [["100", "101"], ["20", "20"]]


def test_routes_without_limits_keep_the_servers(server: KapowServer) -> None:
    # the server's own limits (but open files, which it raises for itself at start)
    server.add_route(
        "/free",
        "grep -E '^Max (address space|cpu time|file size|processes)' /proc/self/limits | kapow set /response/body",
    )
    with open("/proc/self/limits") as f:
        ours = [
            line.split()[-3:-1]
            for line in f
            if line.startswith(("Max address space", "Max cpu time", "Max file size", "Max processes"))
        ]
    assert sorted(line.split()[-3:-1] for line in body(server, "/free").splitlines()) == sorted(ours)
