"""Server options: defaults as the reference's, and listener addresses."""

from __future__ import annotations

import os
import subprocess

import pytest
from twisted.python.usage import UsageError

from kapow.server.assembly import Options, StartupError, parse_listen_address
from tests.kapowserver import KAPOW


def parsed(*args: str) -> dict:
    options = Options()
    options.parseOptions(list(args))
    return dict(options)


def test_defaults_are_the_reference_ones() -> None:
    assert parsed() == {
        "bind": "0.0.0.0:8080",
        "control-bind": "localhost:8081",
        "data-bind": "localhost:8082",
        "control-reachable-addr": None,
        "certfile": None,
        "keyfile": None,
        "clientauth": 0,
        "clientcafile": None,
        "control-credentials": None,
        "write-control-credentials": None,
        "data-client": "auto",
        "debug": 0,
        "keep-running-on-disconnect": 0,
        "handler-timeout": None,
        "kill-grace": 3.0,
        "max-handlers": None,
        "queue": 0,
        "queue-timeout": 30.0,
        "limits": {},
        "shutdown-timeout": 30.0,
        "workers": 1,
        "worker": None,
        "header-timeout": 30.0,
        "idle-timeout": 60.0,
        "body-min-rate": 500.0,
        "backlog": None,
        "max-connections": None,
        "trusted-proxies": None,
        "metrics-bind": None,
        "init_programs": [],
    }


def test_abuse_limits_flags() -> None:
    options = parsed(
        "--header-timeout", "1.5", "--idle-timeout", "2", "--body-min-rate", "64",
        "--backlog", "128", "--max-connections", "10",
    )  # fmt: skip
    assert (
        options["header-timeout"], options["idle-timeout"], options["body-min-rate"],
        options["backlog"], options["max-connections"],
    ) == (1.5, 2.0, 64.0, 128, 10)  # fmt: skip


@pytest.mark.parametrize(
    "flag", ["--header-timeout", "--idle-timeout", "--body-min-rate", "--backlog", "--max-connections"]
)
@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "abc", "nan", "inf", ""])
def test_abuse_limits_must_be_positive_numbers(flag: str, value: str) -> None:
    with pytest.raises(UsageError) as caught:
        parsed(flag, value)
    assert str(caught.value) == f"{flag} must be a positive number, not {value!r}"


def test_counts_must_be_integers() -> None:
    for flag in ("--backlog", "--max-connections"):
        with pytest.raises(UsageError, match=r"must be a positive number, not '1\.5'"):
            parsed(flag, "1.5")


def test_governance_flags() -> None:
    options = parsed(
        "--handler-timeout", "2.5", "--kill-grace", "0", "--max-handlers", "8",
        "--shutdown-timeout", "10", "--keep-running-on-disconnect",
    )  # fmt: skip
    assert (
        options["handler-timeout"], options["kill-grace"], options["max-handlers"],
        options["shutdown-timeout"], options["keep-running-on-disconnect"],
    ) == (2.5, 0.0, 8, 10.0, 1)  # fmt: skip


def test_queue_and_limit_flags() -> None:
    options = parsed(
        "--max-handlers", "2", "--queue", "7", "--queue-timeout", "1.5",
        "--limit", "memory=256M", "--limit", "cpu=10", "--limit", "file_size=2k", "--limit", "cpu=3",
    )  # fmt: skip
    assert (options["queue"], options["queue-timeout"]) == (7, 1.5)
    assert options["limits"] == {"memory": 256 << 20, "cpu": 3, "file_size": 2048}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--queue", "-1"], "--queue must be at least 0"),
        (["--queue", "1.5"], "--queue must be a number, not '1.5'"),
        (["--queue", "99999999"], "--queue must be at most 1000000"),
        (["--queue-timeout", "0"], "--queue-timeout must be at least 0.001"),
        (["--queue-timeout", "inf"], "--queue-timeout must be at least 0.001"),
        (["--limit", "memory=lots"], "memory must be a whole number"),
        (["--limit", "memory=-1"], "memory must be a whole number"),
        (["--limit", "cpu=1.5"], "cpu must be a whole number"),
        (["--limit", "cpu=1K"], "cpu must be a whole number"),
        (["--limit", "cpu=0"], "cpu must be from 1 to"),
        (["--limit", "memory=99999999999G"], "memory must be from 1 to"),
        (["--limit", "stack=1"], "unknown limit 'stack'"),
        (["--limit", "memory"], "expected NAME=VALUE"),
    ],
)
def test_bad_queue_and_limit_flags_are_one_line_and_status_1(args: list[str], message: str) -> None:
    result = subprocess.run([KAPOW, "server", *args], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("kapow server: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr


def test_data_client_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parsed("--data-client", "python")["data-client"] == "python"
    with pytest.raises(UsageError, match="must be auto, native or python, not 'c'"):
        parsed("--data-client", "c")
    monkeypatch.setattr("kapow.server.assembly.native_client", lambda: None)  # as when no compiler was there
    with pytest.raises(UsageError, match="the native client was not built"):
        parsed("--data-client", "native")
    assert parsed("--data-client", "auto")["data-client"] == "auto"


def test_init_programs_and_flags() -> None:
    options = parsed("--debug", "--bind", "[::1]:9000", "a.pow", "b.pow")
    assert (options["debug"], options["bind"], options["init_programs"]) == (
        1,
        "[::1]:9000",
        ["a.pow", "b.pow"],
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--certfile", "c"], "--certfile and --keyfile go together"),
        (["--keyfile", "k"], "--certfile and --keyfile go together"),
        (["--clientauth"], "--clientauth needs HTTPS"),
        (["--clientcafile", "ca", "--certfile", "c", "--keyfile", "k"], "--clientcafile needs --clientauth"),
        (["--bind", "nonsense"], "invalid address"),
        (["--control-reachable-addr", "noport"], "missing port"),
        (["--handler-timeout", "0"], "at least"),
        (["--handler-timeout", "soon"], "must be a number"),
        (["--max-handlers", "0"], "at least 1"),
        (["--max-handlers", "1.5"], "must be a number"),
        (["--kill-grace", "-1"], "at least 0"),
        (["--shutdown-timeout", "nan"], "at least"),
    ],
)
def test_invalid_combinations(args: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parsed(*args)


@pytest.mark.parametrize(
    ("addr", "description", "host"),
    [
        ("0.0.0.0:8080", "tcp:port=8080:interface=0.0.0.0", "0.0.0.0"),
        ("localhost:8081", "tcp:port=8081:interface=localhost", "localhost"),
        (":8080", "tcp:port=8080", None),
        ("[::1]:8082", "tcp6:port=8082:interface=\\:\\:1", "::1"),
        ("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1", None),
        ("unix:/run/kapow.sock", "unix:/run/kapow.sock", None),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0", None),
    ],
)
def test_listen_addresses(addr: str, description: str, host: str | None) -> None:
    assert parse_listen_address(addr) == (description, host)


@pytest.mark.parametrize(
    "addr", ["", "8080", "host:", "host:port", "[nothex]:1", "a:70000", "[::1", "ssl:8443", "tls:8443"]
)
def test_bad_listen_addresses(addr: str) -> None:
    with pytest.raises(StartupError):
        parse_listen_address(addr)


def test_workers_option() -> None:
    assert parsed("--workers", "3")["workers"] == 3
    assert parsed("--workers", "auto")["workers"] == len(os.sched_getaffinity(0))
    with pytest.raises(UsageError, match=r"^--workers must be at least 1$"):
        parsed("--workers", "0")
    with pytest.raises(UsageError, match=r"^--workers must be a number or auto, not 'x'$"):
        parsed("--workers", "x")
    assert "--worker=" not in Options().getUsage()  # the workers' own option stays internal


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "--workers must be at least 1"), ("x", "--workers must be a number or auto, not 'x'")],
)
def test_a_bad_workers_value_is_one_line_and_status_1(value: str, message: str) -> None:
    result = subprocess.run([KAPOW, "server", "--workers", value], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"kapow server: error: {message}\n")
