"""kapow.core.resource_limits: the --limit syntax and the command lines that apply limits."""

from __future__ import annotations

import pytest

from kapow.core import resource_limits, routes
from kapow.core.resource_limits import InvalidLimit, LimitedCommand, parse_limit, parse_limits


def test_the_names_and_bounds_are_the_route_tables() -> None:
    assert tuple(resource_limits.NAMES) == routes.LIMIT_NAMES
    assert resource_limits.MAXIMUM == routes.MAX_LIMIT


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("memory=256M", ("memory", 256 << 20)),
        ("memory=1g", ("memory", 1 << 30)),
        ("file_size=4K", ("file_size", 4096)),
        ("file_size=100", ("file_size", 100)),
        ("cpu=10", ("cpu", 10)),
        ("open_files=64", ("open_files", 64)),
        ("processes=5", ("processes", 5)),
        (" cpu = 3 ", ("cpu", 3)),
    ],
)
def test_limits_of_the_command_line(text: str, parsed: tuple[str, int]) -> None:
    assert parse_limit(text) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "memory", "memory=", "memory=lots", "memory=-1", "memory=1.5G", "memory=0", "memory=1T",
        "memory=99999999999G", "cpu=1K", "cpu=1.5", "cpu=0", "cpu=٣", "stack=1", "=1", "open_files=1e3",
    ],
)  # fmt: skip
def test_bad_limits_of_the_command_line(text: str) -> None:
    with pytest.raises(InvalidLimit) as raised:
        parse_limit(text)
    assert "\n" not in str(raised.value) and repr(text) in str(raised.value)


def test_a_later_limit_of_a_name_wins() -> None:
    assert parse_limits(["cpu=1", "memory=1K", "cpu=2"]) == {"memory": 1024, "cpu": 2}


def test_the_native_command_line() -> None:
    argv = LimitedCommand("/kapow", "/usr/bin/prlimit").argv(
        {"cpu": 3, "memory": 1024}, "/bin/sh", ["sh", "-c", "x"]
    )
    assert argv == ["/kapow", "--with-limits", "memory=1024", "cpu=3", "--", "/bin/sh", "-c", "x"]


def test_the_prlimit_command_line() -> None:
    argv = LimitedCommand(None, "/usr/bin/prlimit").argv(
        {"processes": 9, "cpu": 3, "open_files": 8, "file_size": 7, "memory": 6}, "/bin/sh", ["sh", "-c", "x"]
    )
    assert argv == [
        "/usr/bin/prlimit", "--as=6:6", "--cpu=3:4", "--nofile=8:8", "--fsize=7:7", "--nproc=9:9",
        "--", "/bin/sh", "-c", "x",
    ]  # fmt: skip


def test_finding_a_way(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LimitedCommand.find("/kapow") is not None
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(resource_limits, "_which", lambda name: None)
    assert LimitedCommand.find(None) is None
    assert LimitedCommand.find("/kapow").native == "/kapow"  # type: ignore[union-attr]
