"""Tests for what the operator's commands decide before any call: their lines of error,
the control URL they use, the credentials directory's files, and how they parse.

Everything here reads and writes real files under ``tmp_path``; nothing is
sent (tests/e2e/test_operator_commands.py runs the commands against a server).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kapow.commands import control_credentials, handlers, history, routes
from kapow.commands.control import (
    DEFAULT_CONTROL_URL,
    NO_CREDENTIALS,
    CommandError,
    UsageError,
    context,
    control_url,
    parse_action,
)
from kapow.commands.data_client import _parse_args
from kapow.core import credentials
from kapow.core.credentials import CONTROL_URL_FILE
from kapow.server.assembly import ClientCredentialsFiles
from kapow.server.service import StartupError

#: What a credentials directory written for clients holds.
CLIENT_FILES = ["server.crt", "client.crt", "client.key", CONTROL_URL_FILE]

# -- the line of an error --------------------------------------------------------------


def test_an_error_is_one_line_naming_the_command() -> None:
    assert CommandError("cannot read x: No such file").line("kapow route add") == (
        "kapow route add: cannot read x: No such file"
    )
    assert CommandError("two\nlines  here").line("kapow history") == "kapow history: two lines here"


def test_a_usage_error_points_at_the_help() -> None:
    assert UsageError("--burst needs --rate").line("kapow route add") == (
        "kapow route add: --burst needs --rate (see kapow route add --help)"
    )


def test_an_error_of_a_parser_names_its_own_command() -> None:
    error = UsageError("unrecognized arguments: x", "kapow route list")
    assert str(error) == "kapow route list: unrecognized arguments: x"
    assert (
        error.line("kapow route")
        == "kapow route list: unrecognized arguments: x (see kapow route list --help)"
    )


#: How each command parses its words (those after ``kapow COMMAND``).
PARSE: dict[str, Callable[[list[str]], argparse.Namespace]] = {
    "route": routes._parse,
    "handler": lambda argv: parse_action(*handlers._parser(), argv),
    "history": history._parse,
}


@pytest.mark.parametrize(
    ("command", "argv", "line"),
    [
        ("route", ["add"], "kapow route add: the following arguments are required: URL_PATTERN"),
        ("route", ["list", "x"], "kapow route list: unrecognized arguments: x"),
        ("route", ["get"], "kapow route get: the following arguments are required: ID"),
        ("route", [], "kapow route: the following arguments are required: ACTION"),
        ("route", ["bogus"], "kapow route: argument ACTION: invalid choice: 'bogus'"),
        ("handler", ["kill"], "kapow handler kill: the following arguments are required: ID"),
        ("history", ["x", "--json", "--limit", "2"], "kapow history: ID takes no --limit"),
        ("history", ["--outcome", "fine"], "kapow history: argument --outcome: invalid choice: 'fine'"),
    ],
)
def test_what_each_parser_refuses(command: str, argv: list[str], line: str) -> None:
    with pytest.raises(UsageError) as caught:
        PARSE[command](argv)
    shown = caught.value.line("the command that runs")
    assert shown.startswith(line)
    assert shown.endswith(f"(see {line.split(':')[0]} --help)")


@pytest.mark.parametrize(
    ("argv", "fields"),
    [
        (["remove", "r1", "--control-url", "https://h:1"], {"route_id": "r1", "control_url": "https://h:1"}),
        (["get", "--control-url", "https://h:1", "r1"], {"route_id": "r1", "control_url": "https://h:1"}),
        (["add", "/p", "-c", "true", "-X", "PUT"], {"url_pattern": "/p", "command": "true", "method": "PUT"}),
        (["list", "--control-credentials", "/d"], {"control_credentials": "/d"}),
    ],
)
def test_route_options_may_follow_the_arguments(argv: list[str], fields: dict[str, str]) -> None:
    args = routes._parse(argv)
    assert {name: getattr(args, name) for name in fields} == fields
    assert args.action == argv[0]


def test_history_options_may_follow_the_id() -> None:
    args = history._parse(["7f1c", "--json", "--control-url", "https://h:1"])
    assert (args.run_id, args.json, args.control_url) == ("7f1c", True, "https://h:1")


# -- which control URL ----------------------------------------------------------------------


def _args(url: str | None = None, directory: Path | None = None) -> argparse.Namespace:
    return argparse.Namespace(
        control_url=url, control_credentials=None if directory is None else str(directory)
    )


def test_the_control_url_flag_wins(tmp_path: Path) -> None:
    (tmp_path / CONTROL_URL_FILE).write_text("https://dir:1\n")
    env = {"KAPOW_CONTROL_URL": "https://env:2"}
    assert control_url(_args("https://flag:3", tmp_path), env) == "https://flag:3"


def test_then_the_environment(tmp_path: Path) -> None:
    (tmp_path / CONTROL_URL_FILE).write_text("https://dir:1\n")
    assert control_url(_args(None, tmp_path), {"KAPOW_CONTROL_URL": "https://env:2"}) == "https://env:2"


def test_then_the_url_the_directory_records(tmp_path: Path) -> None:
    (tmp_path / CONTROL_URL_FILE).write_text("  https://dir:1\n")
    assert control_url(_args(None, tmp_path), {"KAPOW_CONTROL_URL": ""}) == "https://dir:1"


def test_else_the_default(tmp_path: Path) -> None:
    assert control_url(_args(None, tmp_path), {}) == DEFAULT_CONTROL_URL
    assert control_url(_args(None, None), {}) == DEFAULT_CONTROL_URL
    (tmp_path / CONTROL_URL_FILE).write_text("\n")
    assert control_url(_args(None, tmp_path), {}) == DEFAULT_CONTROL_URL


def test_an_unreadable_record_is_one_line(tmp_path: Path) -> None:
    (tmp_path / CONTROL_URL_FILE).write_bytes(b"https://\xff\n")
    with pytest.raises(CommandError) as caught:
        control_url(_args(None, tmp_path), {})
    assert str(caught.value) == f"{tmp_path / CONTROL_URL_FILE}: not UTF-8 text"


def test_no_credentials_at_all_names_both_ways_to_give_them() -> None:
    with pytest.raises(CommandError) as caught:
        context(None, {"KAPOW_CONTROL_URL": "https://localhost:8081"})
    assert caught.value.message == NO_CREDENTIALS
    for way in ("--control-credentials DIR", "KAPOW_CONTROL_CREDENTIALS", "KAPOW_CONTROL_*"):
        assert way in NO_CREDENTIALS


def test_some_of_the_variables_name_the_one_missing() -> None:
    env = credentials.credentials_environ(credentials.generate_control_credentials("localhost:1"))
    del env["KAPOW_CONTROL_CLIENT_KEY"]
    with pytest.raises(CommandError, match="KAPOW_CONTROL_CLIENT_KEY is not set"):
        context(None, env)


# -- the credentials directory --------------------------------------------------------------


def test_the_client_credentials_record_the_url(tmp_path: Path) -> None:
    creds = credentials.generate_control_credentials("127.0.0.1:9000")
    directory = tmp_path / "creds"
    credentials.write_client_credentials(creds, str(directory), "https://127.0.0.1:9000")
    assert (directory / CONTROL_URL_FILE).read_text() == "https://127.0.0.1:9000\n"
    assert os.stat(directory / CONTROL_URL_FILE).st_mode & 0o777 == 0o600
    assert credentials.read_control_url(str(directory)) == "https://127.0.0.1:9000"
    assert credentials.existing_credentials(str(directory)) == CLIENT_FILES


def test_without_a_url_none_is_recorded(tmp_path: Path) -> None:
    creds = credentials.generate_control_credentials("127.0.0.1:9000")
    credentials.write_client_credentials(creds, str(tmp_path / "creds"))
    assert credentials.read_control_url(str(tmp_path / "creds")) is None
    assert credentials.read_control_url(str(tmp_path / "none")) is None
    assert credentials.existing_credentials(str(tmp_path / "none")) == []


def test_control_credentials_writes_a_full_set_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "persistent"
    argv = [str(directory), "--control-reachable-addr", "127.0.0.1:9000"]
    assert control_credentials.main(argv) == 0
    assert capsys.readouterr() == (
        f"wrote server.crt, server.key, client.crt, client.key, control_url (https://127.0.0.1:9000) in {directory}\n",
        "",
    )
    first = credentials.load_control_credentials(str(directory))
    assert credentials.read_control_url(str(directory)) == "https://127.0.0.1:9000"

    assert control_credentials.main(argv) == 1
    assert capsys.readouterr() == (
        "",
        f"kapow control-credentials: {directory} already holds control credentials (server.crt, server.key, "
        "client.crt, client.key, control_url); give --force to replace them\n",
    )
    assert credentials.load_control_credentials(str(directory)) == first

    assert control_credentials.main([*argv, "--force"]) == 0
    assert credentials.load_control_credentials(str(directory)) != first


def test_control_credentials_records_the_default_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --control-reachable-addr, the URL clients use by default."""
    assert control_credentials.main([str(tmp_path / "c")]) == 0
    assert credentials.read_control_url(str(tmp_path / "c")) == "https://localhost:8081"
    assert capsys.readouterr().err == ""


def test_control_credentials_refuses_a_bad_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert control_credentials.main([str(tmp_path / "c"), "--control-reachable-addr", "nohost"]) == 1
    assert capsys.readouterr() == (
        "",
        "kapow control-credentials: control reachable address 'nohost': missing port; expected host:port "
        "(see kapow control-credentials --help)\n",
    )
    assert not (tmp_path / "c").exists()


def test_a_credentials_error_is_no_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    assert control_credentials.main([str(shared)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(
        f"kapow control-credentials: credentials directory {shared} is accessible"
    )
    assert "--help" not in err and err.count("\n") == 1


# -- kapow get / set / unset: where options may be ----------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "parsed"),
    [
        (b"get", [b"/r", b"--handler", b"h"], (None, b"h", [b"/r"])),
        (b"get", [b"/r", b"--data-url=u", b"--handler=h"], (b"u", b"h", [b"/r"])),
        (b"unset", [b"--handler", b"h", b"/r", b"--data-url", b"u"], (b"u", b"h", [b"/r"])),
        (b"set", [b"/r", b"--handler=h"], (None, None, [b"/r", b"--handler=h"])),
        (b"set", [b"/r", b"v", b"--handler=h"], (None, b"h", [b"/r", b"v"])),
        (b"set", [b"/r", b"--", b"--handler=h"], (None, None, [b"/r", b"--handler=h"])),
        (b"get", [b"--", b"--handler"], (None, None, [b"--handler"])),
    ],
)
def test_data_options_come_anywhere_but_in_the_place_of_value(
    command: bytes, args: list[bytes], parsed: tuple[object, ...]
) -> None:
    assert _parse_args(args, command) == parsed


def test_help_may_follow_the_resource_of_get() -> None:
    assert _parse_args([b"/r", b"--help"], b"get") is None


# -- what the server writes ------------------------------------------------------------------


@pytest.mark.parametrize("start", ["privilegedStartService", "startService"])
def test_the_server_writes_its_directory_once_started(tmp_path: Path, start: str) -> None:
    creds = credentials.generate_control_credentials("127.0.0.1:9000")
    urls = ["https://127.0.0.1:9001", "https://127.0.0.1:9000"]
    directory = tmp_path / "creds"
    files = ClientCredentialsFiles(creds, str(directory), urls.pop)
    assert not directory.exists()
    getattr(files, start)()
    files.startService()  # after privilegedStartService (twistd), nothing more is written
    assert credentials.read_control_url(str(directory)) == "https://127.0.0.1:9000"
    assert credentials.existing_credentials(str(directory)) == CLIENT_FILES


def test_a_directory_the_server_cannot_write_stops_the_start(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    files = ClientCredentialsFiles(
        credentials.generate_control_credentials("127.0.0.1:9000"), str(shared), str
    )
    with pytest.raises(
        StartupError, match=f"^control credentials: credentials directory {shared} is accessible"
    ):
        files.startService()
