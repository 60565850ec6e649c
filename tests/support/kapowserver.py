"""
Start a real ``kapow server`` (or ``twist kapow``) as a child process on
ports it picks itself, and drive it with the real CLI and curl.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kapow.handlers.procfs import live_members

VENV_BIN = Path(sys.executable).parent
KAPOW = str(VENV_BIN / "kapow")
TWIST = str(VENV_BIN / "twist")

_LISTENING = re.compile(r"(user|control|data) interface listening on (\S+)")


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``condition`` until it returns something true, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class KapowServer:
    """
    A running server. ``urls`` maps ``user``/``control``/``data`` to the
    URLs it logged; ``creds`` is the directory its control credentials were
    written to.
    """

    def __init__(
        self,
        tmp: Path,
        init_programs: Sequence[str] = (),
        extra: Sequence[str] = (),
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.creds = tmp / "creds"
        argv = [
            *(command or [KAPOW, "server"]),
            "--bind", "127.0.0.1:0",
            "--control-bind", "127.0.0.1:0",
            "--data-bind", "127.0.0.1:0",
            "--write-control-credentials", str(self.creds),
            *extra,
            *init_programs,
        ]  # fmt: skip
        child_env = dict(os.environ if env is None else env)
        for name in ("KAPOW_CONTROL_URL", "KAPOW_DATA_URL", "KAPOW_HANDLER_ID"):
            child_env.pop(name, None)
        self.launch(argv, child_env)

    def launch(self, argv: Sequence[str], env: dict[str, str], pass_fds: Sequence[int] = ()) -> None:
        """Start ``argv`` and wait until it logged its three listeners."""
        self.lines: list[str] = []
        self.urls: dict[str, str] = {}
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            pass_fds=pass_fds,
            start_new_session=True,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: len(self.urls) == 3 or self.process.poll() is not None, 20, "listeners")
        if len(self.urls) != 3:
            self.stop()
            raise AssertionError("server did not start:\n" + self.output())

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            m = _LISTENING.search(line)
            if m:
                self.urls[m.group(1)] = m.group(2)

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until a log line matches ``pattern``; return the match."""
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            for line in list(self.lines):
                m = regex.search(line)
                if m:
                    return m
            return None

        try:
            return wait_for(found, timeout, pattern)  # type: ignore[return-value]
        except AssertionError:
            raise AssertionError(f"no log line matches {pattern!r}:\n{self.output()}") from None

    @property
    def user(self) -> str:
        return self.urls["user"]

    @property
    def control(self) -> str:
        return self.urls["control"]

    @property
    def data(self) -> str:
        return self.urls["data"]

    def curl_control(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        """curl the control API with the written client credentials."""
        return curl(
            "--cert", str(self.creds / "client.crt"),
            "--key", str(self.creds / "client.key"),
            "--cacert", str(self.creds / "server.crt"),
            *args,
            input=input,
        )  # fmt: skip

    def kapow(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the ``kapow`` CLI as an operator shell would, with the credentials directory."""
        env = dict(os.environ)
        env["KAPOW_CONTROL_URL"] = self.control
        env["KAPOW_CONTROL_CREDENTIALS"] = str(self.creds)
        return subprocess.run(
            [KAPOW, *args], input=input, capture_output=True, text=True, env=env, timeout=30
        )

    def add_route(self, pattern: str, command: str, *flags: str) -> dict:
        result = self.kapow("route", "add", *flags, pattern, "-c", command)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._reader.join(5)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.process.returncode


def bare_environ(**variables: str) -> dict[str, str]:
    """This process's environment without any ``KAPOW_*`` variable, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAPOW_")}
    env.update(variables)
    return env


def run_kapow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``kapow ARGS`` in ``env``, run to its end (30 s at most)."""
    return subprocess.run([KAPOW, *args], capture_output=True, text=True, env=env, timeout=30)


# Runs ``kapow ARGS`` in this interpreter, then writes the modules it imported to a file.
_THEN_MODULES = """\
import sys
from kapow.cli import main
try:
    status = main(["kapow", *sys.argv[2:]])
except SystemExit as e:
    status = e.code
with open(sys.argv[1], "w") as f:
    f.write("\\n".join(sorted(sys.modules)))
sys.exit(status)
"""


def run_then_modules(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``kapow ARGS`` run in an interpreter of its own, and the modules it imported."""
    with tempfile.TemporaryDirectory(prefix="kapow-test-modules-") as directory:
        listing = Path(directory) / "modules.txt"
        run = subprocess.run(
            [sys.executable, "-c", _THEN_MODULES, str(listing), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        # none if it failed before writing them: the caller's check of ``run`` says why
        return run, set(listing.read_text().split()) if listing.exists() else set()


def curl(*args: str, input: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run curl without any CA bundle from the environment."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
    }
    return subprocess.run(
        ["curl", "-sS", *args],
        capture_output=True,
        env=env,
        timeout=timeout,
        input=input,
        text=input is None,
    )


def write_program(path: Path, text: str) -> str:
    """Write an executable script and return its path."""
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, from /proc."""
    return live_members(pgid)


def read_int(path: Path) -> int:
    """Wait for ``path`` to hold a number (written by a handler) and return it."""
    return int(wait_for(lambda: path.exists() and path.read_text().strip(), what=f"{path}"))  # type: ignore[arg-type]
