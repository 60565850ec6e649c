"""The commands an operator runs, as the operator sees them: ``kapow route``,
``kapow handler``, ``kapow history``, ``kapow control-credentials`` and the
usage errors of ``kapow get``, run as processes against real servers.

A credentials directory records the control URL it was written for, so that
it alone reaches the server; every failure is one line on stderr, exit
status 1, nothing on stdout; and the commands start lean.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kapow.commands.control import NO_CREDENTIALS
from tests.support.kapowserver import KapowServer, bare_environ, free_port, run_kapow, run_then_modules

CREDENTIALS_FILES = ("server.crt", "server.key", "client.crt", "client.key", "control_url")


def _failure(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed on stderr, once checked that it printed nothing else."""
    assert (result.returncode, result.stdout) == (1, ""), result
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    return result.stderr[:-1]


# -- messages -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("route", "add"),
            "kapow route add: the following arguments are required: URL_PATTERN (see kapow route add --help)",
        ),
        (
            ("route", "add", "/x", "--burst", "3"),
            "kapow route add: --burst needs --rate (see kapow route add --help)",
        ),
        (
            ("route", "add", "/x", "-c", "true", "./file"),
            "kapow route add: give the command with -c or in COMMAND_FILE, not both (see kapow route add --help)",
        ),
        (
            ("route", "list", "extra"),
            "kapow route list: unrecognized arguments: extra (see kapow route list --help)",
        ),
        (("route",), "kapow route: the following arguments are required: ACTION (see kapow route --help)"),
        (
            ("route", "remove", "--control-url"),
            "kapow route remove: argument --control-url: expected one argument (see kapow route remove --help)",
        ),
        (
            ("handler", "kill"),
            "kapow handler kill: the following arguments are required: ID (see kapow handler kill --help)",
        ),
        (("history", "x", "--limit", "3"), "kapow history: ID takes no --limit (see kapow history --help)"),
        (
            ("history", "--since", "soon"),
            "kapow history: argument --since: not an RFC 3339 time: 'soon' (see kapow history --help)",
        ),
        (
            ("control-credentials",),
            "kapow control-credentials: the following arguments are required: DIR "
            "(see kapow control-credentials --help)",
        ),
        (("route", "list"), f"kapow route list: {NO_CREDENTIALS}"),
        (("history",), f"kapow history: {NO_CREDENTIALS}"),
    ],
)
def test_each_failure_is_one_line(args: tuple[str, ...], line: str) -> None:
    assert _failure(run_kapow(bare_environ(), *args)) == line


def test_a_missing_directory_names_its_file(tmp_path: Path) -> None:
    result = run_kapow(bare_environ(KAPOW_CONTROL_CREDENTIALS=str(tmp_path / "none")), "handler", "list")
    assert _failure(result) == f"kapow handler list: {tmp_path / 'none' / 'server.crt'}: no such file"


def test_what_the_control_api_says_stays_its_own(server: KapowServer) -> None:
    env = bare_environ(KAPOW_CONTROL_CREDENTIALS=str(server.creds))
    assert _failure(run_kapow(env, "route", "get", "nope")) == "kapow: Route Not Found"
    refused = run_kapow(env, "route", "add", "/bad/{", "-c", "true")
    assert _failure(refused).startswith("kapow: Invalid Route: ")


# -- the credentials directory alone -----------------------------------------------------------


def test_the_directory_records_the_servers_control_url(server: KapowServer) -> None:
    assert (server.creds / "control_url").read_text() == server.control + "\n"
    assert oct((server.creds / "control_url").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("how", ["variable", "flag"])
def test_the_directory_alone_reaches_the_server(server: KapowServer, how: str) -> None:
    flags: tuple[str, ...] = ()
    if how == "variable":
        env = bare_environ(KAPOW_CONTROL_CREDENTIALS=str(server.creds))
    else:
        env, flags = bare_environ(), ("--control-credentials", str(server.creds))
    added = run_kapow(env, "route", "add", "/hi", "-c", "true", *flags)
    assert (added.returncode, added.stderr) == (0, ""), added
    route = json.loads(added.stdout)
    listed = run_kapow(env, "route", "list", *flags)
    assert [r["id"] for r in json.loads(listed.stdout)] == [route["id"]]
    for args in (("handler", "list"), ("history", "--json")):
        shown = run_kapow(env, *args, *flags)
        assert (shown.returncode, json.loads(shown.stdout), shown.stderr) == (0, [], "")


def test_the_flag_then_the_variable_win_over_the_directory(server: KapowServer) -> None:
    closed = f"https://127.0.0.1:{free_port()}"
    env = bare_environ(KAPOW_CONTROL_CREDENTIALS=str(server.creds), KAPOW_CONTROL_URL=closed)
    assert _failure(run_kapow(env, "route", "list")).startswith(
        f"kapow: cannot reach control API at {closed}: "
    )
    listed = run_kapow(env, "route", "list", "--control-url", server.control)
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "[]\n", "")
    flagged = run_kapow(
        bare_environ(KAPOW_CONTROL_CREDENTIALS=str(server.creds)), "route", "list", "--control-url", closed
    )
    assert _failure(flagged).startswith(f"kapow: cannot reach control API at {closed}: ")


def test_a_persistent_set_reaches_the_server_on_the_port_it_was_made_for(
    start_server: Callable[..., KapowServer], tmp_path: Path
) -> None:
    port = free_port()
    persistent = tmp_path / "persistent"
    made = run_kapow(
        bare_environ(),
        "control-credentials",
        str(persistent),
        "--control-reachable-addr",
        f"127.0.0.1:{port}",
    )
    assert (made.returncode, made.stderr) == (0, "")
    assert made.stdout == f"wrote {', '.join(CREDENTIALS_FILES)} (https://127.0.0.1:{port}) in {persistent}\n"
    start_server(extra=("--control-credentials", str(persistent), "--control-bind", f"127.0.0.1:{port}"))
    listed = run_kapow(bare_environ(KAPOW_CONTROL_CREDENTIALS=str(persistent)), "route", "list")
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "[]\n", "")


# -- options after the arguments -----------------------------------------------------------------


def test_options_may_follow_the_ids(server: KapowServer) -> None:
    env = bare_environ()
    directory = ("--control-credentials", str(server.creds))
    route = json.loads(run_kapow(env, "route", "add", "/late", *directory, "-c", "true", "-X", "PUT").stdout)
    got = run_kapow(env, "route", "get", route["id"], *directory, "--control-url", server.control)
    assert json.loads(got.stdout)["method"] == "PUT"
    removed = run_kapow(env, "route", "remove", route["id"], "--control-url", server.control, *directory)
    assert (removed.returncode, removed.stdout, removed.stderr) == (0, "", "")
    missing = run_kapow(env, "handler", "get", "0" * 32, *directory)
    assert _failure(missing) == "kapow: Handler Not Found"


# -- lean start-up --------------------------------------------------------------------------------


def _imported(env: dict[str, str], *args: str) -> set[str]:
    """The modules ``kapow ARGS`` imported, once it succeeded."""
    run, modules = run_then_modules(env, *args)
    assert (run.returncode, run.stderr) == (0, ""), run
    return modules


@pytest.mark.parametrize("args", [("route", "--help"), ("route", "add", "--help"), ("handler", "--help")])
def test_help_needs_no_tls(args: tuple[str, ...]) -> None:
    modules = _imported(bare_environ(), *args)
    assert {"ssl", "socket", "json", "kapow.commands.control_call"} & modules == set()


def test_reading_commands_leave_out_what_they_do_not_need(server: KapowServer) -> None:
    env = bare_environ(KAPOW_CONTROL_CREDENTIALS=str(server.creds))
    route = server.add_route("/r", "true")
    for args in (("route", "list"), ("route", "get", route["id"]), ("handler", "list"), ("history",)):
        modules = _imported(env, *args)
        assert "kapow.commands.control_call" in modules
        left_out = {
            "kapow.core.runs",
            "kapow.core.traffic",
            "kapow.core.resource_limits",
            "dataclasses",
            "typing",
        }
        assert left_out & modules == set(), args
