"""
Handlers never outlive the server: a real server is killed with SIGKILL while
a handler runs with children in the background, and after a short poll none
of them is left; the same for a worker of ``--workers 2``, and for the
reaper's environment mode on its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kapow.handlers import reaper
from kapow.handlers.containment import make_cgroup
from kapow.handlers.reaper import marked_processes
from tests.support.kapowserver import KAPOW, KapowServer, wait_for

#: A handler that starts a background child in its own group, one that makes
#: a session of its own (escaping its process group), and waits.
HANDLER = (
    "sleep 300 & echo $! > {tmp}/child; "
    "setsid sleep 300 & echo $! > {tmp}/escaped; "
    "echo $$ > {tmp}/leader; kapow set /response/stream started; wait"
)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


def gone(pids: list[int], timeout: float = 3.0) -> bool:
    """Poll until none of ``pids`` is alive, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def contained(server: KapowServer) -> bool:
    """Whether the server runs in a cgroup of its own (or finds handlers by their environment)."""
    return "contained" in server.wait_log(r"handlers are contained|found by their environment").group(0)


def start_handler(server: KapowServer, tmp: Path) -> tuple[subprocess.Popen, dict[str, int]]:
    server.add_route("/bg", HANDLER.format(tmp=tmp))
    client = subprocess.Popen(["curl", "-sS", "-N", server.user + "/bg"], stdout=subprocess.PIPE)
    pids = {}
    for name in ("leader", "child", "escaped"):
        path = tmp / name
        pids[name] = int(wait_for(lambda p=path: p.exists() and p.read_text().strip(), what=name))  # type: ignore[arg-type]
    return client, pids


def kill_server(server: KapowServer) -> None:
    os.kill(server.process.pid, signal.SIGKILL)  # the server's pid only, never its group
    server.process.wait(10)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigkill_of_the_server_leaves_no_handler_process(tmp_path: Path, workers: str) -> None:
    server = KapowServer(tmp_path, extra=["--workers", workers])
    client = None
    try:
        is_contained = contained(server)
        client, pids = start_handler(server, tmp_path)
        assert all(alive(pid) for pid in pids.values())
        kill_server(server)
        mine = [pids["leader"], pids["child"]] + ([pids["escaped"]] if is_contained else [])
        assert gone(mine), f"left running: {[p for p in mine if alive(p)]}"
        if not is_contained:  # found by its environment all the same
            assert gone([pids["escaped"]])
    finally:
        if client is not None:
            client.kill()
            client.wait()
        server.stop()
        for name in ("leader", "child", "escaped"):
            path = tmp_path / name
            if path.exists():
                try:
                    os.kill(int(path.read_text()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass


def test_killing_the_servers_whole_process_group_leaves_no_handler_process(tmp_path: Path) -> None:
    server = KapowServer(tmp_path)
    client = None
    try:
        is_contained = contained(server)
        client, pids = start_handler(server, tmp_path)
        os.killpg(server.process.pid, signal.SIGKILL)  # the server leads the group the test started
        server.process.wait(10)
        mine = list(pids.values()) if is_contained else [pids["leader"], pids["child"]]
        assert gone(mine), f"left running: {[p for p in mine if alive(p)]}"
    finally:
        if client is not None:
            client.kill()
            client.wait()
        server.stop()


def test_a_killed_workers_handlers_die_with_it(tmp_path: Path) -> None:
    server = KapowServer(tmp_path, extra=["--workers", "2", "--kill-grace", "0.5"])
    client = None
    try:
        is_contained = contained(server)
        client, pids = start_handler(server, tmp_path)
        worker = int(Path(f"/proc/{pids['leader']}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(worker, signal.SIGKILL)
        mine = [pids["leader"], pids["child"]] + ([pids["escaped"]] if is_contained else [])
        assert gone(mine, timeout=5), f"left running: {[p for p in mine if alive(p)]}"
        assert server.process.poll() is None  # the server itself serves on
    finally:
        if client is not None:
            client.kill()
            client.wait()
        server.stop()


def test_a_graceful_stop_also_ends_what_escaped_its_process_group(tmp_path: Path) -> None:
    server = KapowServer(tmp_path, extra=["--shutdown-timeout", "0", "--kill-grace", "0.2"])
    client = None
    try:
        is_contained = contained(server)
        client, pids = start_handler(server, tmp_path)
        assert server.stop() == 0
        assert gone(list(pids.values()) if is_contained else [pids["leader"], pids["child"]])
        if not is_contained:
            assert gone([pids["escaped"]])
    finally:
        if client is not None:
            client.kill()
            client.wait()
        server.stop()


def test_the_reaper_without_cgroup_kills_the_processes_its_server_started(tmp_path: Path) -> None:
    """The environment mode on its own: what names the server's data URL dies, nothing else."""
    ours_env = {**os.environ, "KAPOW_DATA_URL": "http://127.0.0.1:1", "KAPOW_HANDLER_ID": "x"}
    other_env = {**os.environ, "KAPOW_DATA_URL": "http://127.0.0.1:2", "KAPOW_HANDLER_ID": "y"}
    ours = subprocess.Popen(["sleep", "300"], env=ours_env, start_new_session=True)
    other = subprocess.Popen(["sleep", "300"], env=other_env, start_new_session=True)
    # the reaper's parent stands for the server: it is SIGKILLed
    server = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys, time;"
         "subprocess.Popen([sys.executable, '-m', 'kapow.handlers.reaper', '-', str(os.getpid())]);"
         "time.sleep(300)"],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdin is not None
        server.stdin.write(b"url http://127.0.0.1:1\n")
        server.stdin.close()
        wait_for(lambda: marked_processes({b"http://127.0.0.1:1"}, 0) == [ours.pid], what="marked")
        time.sleep(0.3)  # the reaper has started and read its line
        assert alive(ours.pid)
        server.kill()
        server.wait()
        assert gone([ours.pid])
        assert alive(other.pid)
        assert server.stderr is not None
        assert b"killed 1 processes" in server.stderr.read()
    finally:
        for process in (ours, other, server):
            process.kill()
            process.wait()


def test_no_cgroup_where_the_hierarchy_is_not_one(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        make_cgroup(str(tmp_path), "kapow-1", os.getpid())
    assert not (tmp_path / "kapow-1").exists()


def reaper_of(server_pid: int) -> int:
    """The pid of the reaper beside the server ``server_pid``."""

    def find() -> int | None:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"kapow.handlers.reaper" in cmdline and cmdline[-2] == str(server_pid).encode():
                    return int(entry)
        return None

    return int(wait_for(find, what="the reaper"))  # type: ignore[arg-type]


def test_init_programs_die_with_the_server_and_a_lost_reaper_is_replaced(tmp_path: Path) -> None:
    program = tmp_path / "init.pow"
    program.write_text(
        f"#!/bin/sh\nsleep 300 & echo $! > {tmp_path}/child\necho $$ > {tmp_path}/leader\nwait\n"
    )
    program.chmod(0o755)
    server = KapowServer(tmp_path, init_programs=[str(program)])
    try:
        pids = [
            int(wait_for(lambda p=tmp_path / name: p.exists() and p.read_text().strip(), what=name))  # type: ignore[arg-type]
            for name in ("leader", "child")
        ]
        first = reaper_of(server.process.pid)
        os.kill(first, signal.SIGKILL)
        server.wait_log("the reaper ended: starting another")
        assert reaper_of(server.process.pid) != first
        kill_server(server)
        assert gone(pids), f"left running: {[p for p in pids if alive(p)]}"
    finally:
        server.stop()


@pytest.fixture
def no_cgroup_below() -> Iterator[str]:
    """A cgroup in which no cgroup can be made (``cgroup.max.descendants`` 0)."""
    from kapow.handlers.containment import cgroup_v2_dir

    base = cgroup_v2_dir()
    if base is None:
        pytest.skip("no cgroup v2 hierarchy")
    path = os.path.join(base, f"kapow-test-{os.getpid()}")
    try:
        os.mkdir(path)
    except OSError as e:
        pytest.skip(f"cannot make a cgroup here: {e.strerror}")
    try:
        Path(path, "cgroup.max.descendants").write_text("0")
        yield path
    finally:
        reaper.kill_cgroup(path)
        reaper.remove_cgroup(path)


def test_without_a_cgroup_the_handlers_are_found_by_their_environment(
    tmp_path: Path, no_cgroup_below: str
) -> None:
    enter = f'echo $$ > {no_cgroup_below}/cgroup.procs && exec "$0" "$@"'
    server = KapowServer(tmp_path, command=["/bin/sh", "-c", enter, KAPOW, "server"])
    client = None
    try:
        assert not contained(server)
        client, pids = start_handler(server, tmp_path)
        kill_server(server)
        assert gone(list(pids.values())), f"left running: {[p for p in pids.values() if alive(p)]}"
        server.wait_log(r"kapow reaper: the server \(pid \d+\) is gone: killed \d+ processes")
    finally:
        if client is not None:
            client.kill()
            client.wait()
        server.stop()
