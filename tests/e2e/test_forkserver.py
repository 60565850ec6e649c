"""
The pre-started ``kapow route`` (kapow.commands.forkserver) and the native client's
use of it: every answer is the one the full command line gives, and where
it cannot be asked the full command line runs instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kapow.commands import forkserver
from kapow.commands.launcher import FORKSERVER_SOCKET, write_launcher
from tests.support.kapowserver import wait_for, write_program
from tests.support.native import native_client_or_skip

PACKAGE_PARENT = str(Path(forkserver.__file__).resolve().parents[2])


class Launcher:
    """A launcher directory with the native client, and its forkserver when started."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.kapow = write_launcher(str(directory), native=native_client_or_skip())
        self.socket_path = str(directory / FORKSERVER_SOCKET)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listening.bind(self.socket_path)
        listening.listen(16)
        fd = listening.fileno()
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", forkserver.__file__, PACKAGE_PARENT, str(fd)],
            stdin=subprocess.PIPE,
            pass_fds=(fd,),
        )
        listening.close()

    def run(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([self.kapow, *args], capture_output=True, timeout=30, **kw)

    def stop(self) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=10)


@pytest.fixture
def launchers(tmp_path: Path) -> Iterator[tuple[Launcher, Launcher]]:
    """A launcher with its forkserver running, and one without."""
    served, plain = Launcher(tmp_path / "served"), Launcher(tmp_path / "plain")
    served.start()
    yield served, plain
    served.stop()


def control_env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAPOW_")}
    # a port nothing listens on: the command fails the same way both ways
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env["KAPOW_CONTROL_URL"] = f"https://127.0.0.1:{port}"
    env.update(more)
    return env


@pytest.mark.parametrize(
    "args",
    [
        ("route", "--help"),
        ("route", "add", "--help"),
        ("route",),
        ("route", "bogus"),
        ("route", "add"),
        ("route", "list"),
        ("route", "list", "--control-credentials", "/no/such/dir"),
        ("route", "add", "/x", "-c", "true"),
    ],
)
def test_same_answer_as_the_full_command_line(
    launchers: tuple[Launcher, Launcher], args: tuple[str, ...]
) -> None:
    served, plain = launchers
    env = control_env(KAPOW_CONTROL_CREDENTIALS="/no/such/creds")
    got, expected = served.run(*args, env=env), plain.run(*args, env=env)
    assert (got.returncode, got.stdout, got.stderr) == (expected.returncode, expected.stdout, expected.stderr)
    assert expected.stdout or expected.stderr  # something to compare


def test_the_forkserver_answers(launchers: tuple[Launcher, Launcher]) -> None:
    """Without the full command line beside it, only the forkserver can answer."""
    served, plain = launchers
    os.unlink(served.directory / "kapow-cli")
    os.unlink(plain.directory / "kapow-cli")
    env = control_env(KAPOW_CONTROL_CREDENTIALS=str(served.directory / "probe"))
    got = served.run("route", "list", env=env)
    # the caller's environment reached the command
    assert got.returncode == 1 and str(served.directory / "probe").encode() in got.stderr
    assert served.run("route", "--help").returncode == 0
    assert served.run("--help").returncode == plain.run("route", "--help").returncode == 1


def test_descriptors_directory_and_environment_are_the_callers(
    launchers: tuple[Launcher, Launcher], tmp_path: Path
) -> None:
    """A command file relative to the caller's directory, stdin as ``-``,
    and the exit status all reach the command as if it ran there."""
    served, plain = launchers
    work = tmp_path / "work"
    work.mkdir()
    (work / "cmd.sh").write_text("echo hi\n")
    env = control_env(KAPOW_CONTROL_CREDENTIALS="/no/such/creds")
    for args, stdin in (
        (("route", "add", "/x", "cmd.sh"), None),
        (("route", "add", "/x", "-"), b"echo hi\n"),
    ):
        got = served.run(*args, env=env, cwd=work, input=stdin)
        expected = plain.run(*args, env=env, cwd=work, input=stdin)
        assert (got.returncode, got.stderr) == (expected.returncode, expected.stderr)
    missing = served.run("route", "add", "/x", "missing.sh", env=env, cwd=work)
    assert missing.returncode == 1 and b"missing.sh" in missing.stderr


def test_a_closed_standard_descriptor_runs_the_full_command_line(
    launchers: tuple[Launcher, Launcher],
) -> None:
    served, plain = launchers
    closed = subprocess.run(
        ["/bin/sh", "-c", f"exec 0<&-; exec {served.kapow} route --help"], capture_output=True
    )
    assert closed.returncode == 0
    assert closed.stdout == plain.run("route", "--help").stdout


def test_without_the_socket_the_full_command_line_runs(launchers: tuple[Launcher, Launcher]) -> None:
    served, plain = launchers
    served.stop()
    served.process = None
    # the socket file is still there, with nobody listening
    assert os.path.exists(served.socket_path)
    got = served.run("route", "--help")
    assert got.returncode == 0 and got.stdout == plain.run("route", "--help").stdout


def test_a_child_that_dies_is_reported(launchers: tuple[Launcher, Launcher], tmp_path: Path) -> None:
    """The command killed mid-way: one line on stderr, exit status 1."""
    served, _ = launchers
    # a control URL that accepts and never answers keeps the child waiting
    with socket.socket() as hold:
        hold.bind(("127.0.0.1", 0))
        hold.listen(1)
        env = control_env(KAPOW_CONTROL_CREDENTIALS="/no/such/creds")
        env["KAPOW_CONTROL_URL"] = f"https://127.0.0.1:{hold.getsockname()[1]}"
        creds = tmp_path / "creds"
        subprocess.run([served.kapow, "control-credentials", str(creds)], check=True, capture_output=True)
        env["KAPOW_CONTROL_CREDENTIALS"] = str(creds)
        caller = subprocess.Popen([served.kapow, "route", "list"], env=env, stderr=subprocess.PIPE)
        children = wait_for(lambda: _children(served.process.pid), what="the forked child")  # type: ignore[union-attr]
        os.kill(children[0], signal.SIGKILL)
        _, err = caller.communicate(timeout=30)
    assert caller.returncode == 1
    assert err == b"kapow: the kapow command line of the server ended without an exit status\n"


def test_a_server_with_the_native_client_runs_init_programs_through_it(
    start_server: Any, tmp_path: Path
) -> None:
    native_client_or_skip()
    init = write_program(
        tmp_path / "init.pow",
        '#!/bin/sh\ncd "$(dirname "$0")"\nprintf \'echo piped | kapow set /response/body\\n\' > piped.sh\n'
        "kapow route add /file piped.sh\nkapow route add /stdin - <<'EOF'\necho from-stdin | kapow set /response/body\nEOF\n",
    )
    server = start_server(init)
    server.wait_log(r"init\.pow exited with status 0")
    listing = server.kapow("route", "list")
    assert [r["url_pattern"] for r in __import__("json").loads(listing.stdout)] == ["/file", "/stdin"]
    pid = server.process.pid
    (forked,) = wait_for(
        lambda: [p for p in _children(pid) if b"forkserver" in _cmdline(p)], what="forkserver"
    )
    server.stop()
    wait_for(lambda: not os.path.exists(f"/proc/{forked}"), what="the forkserver's end")


def test_the_forkserver_ends_with_a_killed_server(start_server: Any) -> None:
    native_client_or_skip()
    server = start_server()
    pid = server.process.pid
    (forked,) = wait_for(
        lambda: [p for p in _children(pid) if b"forkserver" in _cmdline(p)], what="forkserver"
    )
    server.stop(signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{forked}"), what="the forkserver's end")


def test_python_data_client_has_no_forkserver(start_server: Any) -> None:
    server = start_server(extra=("--data-client", "python"))
    assert not [p for p in _children(server.process.pid) if b"forkserver" in _cmdline(p)]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
