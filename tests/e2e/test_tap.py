"""
``kapow server`` refuses a bad option in one line on stderr, with exit
status 1 and nothing on stdout (the values themselves: tests/unit/test_options.py).
"""

from __future__ import annotations

import subprocess

import pytest

from tests.support.kapowserver import KAPOW


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
    assert result.stderr.startswith("kapow server: ") and result.stderr.count("\n") == 1
    assert result.stderr.endswith(" (see kapow server --help)\n")
    assert message in result.stderr


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "--workers must be at least 1"), ("x", "--workers must be a number or auto, not 'x'")],
)
def test_a_bad_workers_value_is_one_line_and_status_1(value: str, message: str) -> None:
    result = subprocess.run([KAPOW, "server", "--workers", value], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        "",
        f"kapow server: {message} (see kapow server --help)\n",
    )
