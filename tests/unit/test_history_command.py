"""Tests for kapow.commands.history: the calls ``kapow history`` makes and what it prints.

:func:`kapow.commands.history._request` gives the request the command would
make, as for ``kapow route`` (tests/unit/test_route_command.py); for what it
prints, :func:`kapow.commands.control_call.call` is replaced by a stand-in
that answers as the control API would. Only values argparse cannot parse
are refused here: the server says whether the others are in range.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kapow import cli
from kapow.commands import control, control_call
from kapow.commands import history as history_command
from kapow.commands.control import CommandError
from kapow.commands.history import _parse, _request, shown, table

RECORD: dict[str, Any] = {
    "id": "7f1c0b2e9d8a4c3b2a1f0e9d8c7b6a59",
    "route_id": "f4cfd83b-318a-44f2-a2f0-78a8c5e11ec2",
    "pattern": "/deploy/{env}",
    "method": "POST",
    "path": "/deploy/prod",
    "remote": "10.0.0.7",
    "started": "2026-12-07T03:27:00.123Z",
    "duration_s": 1.5,
    "status": 500,
    "outcome": "error",
    "exit_status": 2,
    "signal": None,
    "bytes_in": 12,
    "bytes_out": 40,
    "mode": "http",
    "job": False,
}
KILLED: dict[str, Any] = {
    **RECORD,
    "id": "0b6a8e43f1d2b6a8e4c7e3f1d2b6a8e4",
    "method": "GET",
    "path": "/slow",
    "started": "2026-12-07T03:26:59.001Z",
    "duration_s": 0.1234,
    "status": None,
    "outcome": "killed",
    "exit_status": None,
    "signal": 15,
}


def sent(*argv: str) -> str:
    """The path and query ``kapow history ARGV`` asks for."""
    _, method, path, body, expected = _request(_parse(list(argv)))
    assert (method, body, expected) == ("GET", None, 200)
    return path


# -- the request -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "path"),
    [
        ((), "/history"),
        (("--json",), "/history"),
        (("--route", "f4cfd83b"), "/history?route_id=f4cfd83b"),
        (("--route", "r 1/&x=y"), "/history?route_id=r%201%2F%26x%3Dy"),
        (("--route", ""), "/history?route_id="),  # the server says what an empty one means
        (("--outcome", "error"), "/history?outcome=error"),
        (("--outcome", "killed"), "/history?outcome=killed"),
        (("--since", "2026-12-07T00:00:00Z"), "/history?since=2026-12-07T00%3A00%3A00Z"),
        (("--since", "2026-12-07T01:00:00.5+01:00"), "/history?since=2026-12-07T01%3A00%3A00.5%2B01%3A00"),
        (("--limit", "10"), "/history?limit=10"),
        (("--limit", "0"), "/history?limit=0"),  # the server refuses it: 400 Invalid Query
        (("--limit", "-3"), "/history?limit=-3"),  # so too
        (("--limit", "20000"), "/history?limit=20000"),  # and this, over 10,000
        (
            ("--json", "--limit", "5", "--since", "2026-12-07T00:00:00Z", "--outcome", "ok", "--route", "r"),
            "/history?route_id=r&outcome=ok&since=2026-12-07T00%3A00%3A00Z&limit=5",
        ),
    ],
)
def test_the_query_of_each_option(argv: tuple[str, ...], path: str) -> None:
    assert sent(*argv) == path


def test_one_run_by_id() -> None:
    assert sent("7f1c0b2e") == "/history/7f1c0b2e"
    assert sent("a/b c?") == "/history/a%2Fb%20c%3F"
    assert sent("--json", "x") == "/history/x"
    assert sent("x", "--json") == "/history/x"


def test_options_parse() -> None:
    args = _parse(["--route", "r", "--outcome", "timeout", "--since", "2026-12-07T00:00:00Z", "--limit", "7"])
    assert (args.route, args.outcome, args.since, args.limit, args.json, args.run_id) == (
        "r",
        "timeout",
        "2026-12-07T00:00:00Z",
        7,
        False,
        None,
    )
    args = _parse(
        ["--control-url", "https://[::1]:9", "--control-credentials", "/etc/kapow/control", "--json"]
    )
    assert (args.control_url, args.control_credentials, args.json) == (
        "https://[::1]:9",
        "/etc/kapow/control",
        True,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--limit", "abc"), "kapow history: argument --limit: invalid int value: 'abc'"),
        (("--limit", "1.5"), "kapow history: argument --limit: invalid int value: '1.5'"),
        (
            ("--outcome", "failed"),
            "kapow history: argument --outcome: invalid choice: 'failed' "
            "(choose from 'ok', 'error', 'signal', 'timeout', 'disconnect', 'killed')",
        ),
        (("--outcome", "OK"), "kapow history: argument --outcome: invalid choice: 'OK'"),
        (("--since", "yesterday"), "kapow history: argument --since: not an RFC 3339 time: 'yesterday'"),
        (("--since", "2026-12-07"), "kapow history: argument --since: not an RFC 3339 time"),
        (
            ("--since", "2026-12-07T00:00:00"),
            "kapow history: argument --since: not an RFC 3339 time with a zone: '2026-12-07T00:00:00'",
        ),
        (("--since", ""), "kapow history: argument --since: not an RFC 3339 time: ''"),
        (("--bogus",), "kapow history: unrecognized arguments: --bogus"),
        (("a", "b"), "kapow history: unrecognized arguments: b"),
        (("x", "--limit", "3"), "kapow history: ID takes no --limit"),
        (("x", "--route", "r", "--outcome", "ok"), "kapow history: ID takes no --route, --outcome"),
        (("",), "kapow history: ID is empty"),
    ],
)
def test_what_is_refused_before_asking(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(CommandError) as caught:
        _request(_parse(list(argv)))
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


# -- the table -------------------------------------------------------------------------


def test_table() -> None:
    assert table([RECORD, KILLED]) == (
        "STARTED                   DURATION  STATUS  OUTCOME  METHOD  PATH          ID\n"
        "2026-12-07T03:27:00.123Z    1.500s     500  error    POST    /deploy/prod  7f1c0b2e9d8a4c3b2a1f0e9d8c7b6a59\n"
        "2026-12-07T03:26:59.001Z    0.123s       -  killed   GET     /slow         0b6a8e43f1d2b6a8e4c7e3f1d2b6a8e4\n"
    )


def test_an_empty_table_is_its_heading() -> None:
    assert table([]) == "STARTED  DURATION  STATUS  OUTCOME  METHOD  PATH  ID\n"


def test_nulls_and_missing_fields_are_dashes() -> None:
    record = {**RECORD, "duration_s": None, "status": None, "method": None, "path": None}
    del record["outcome"]
    line = table([record]).splitlines()[1]
    assert line.split() == ["2026-12-07T03:27:00.123Z", "-", "-", "-", "-", "-", RECORD["id"]]


def test_durations() -> None:
    lines = table([{**RECORD, "duration_s": d} for d in (0, 0.0004, 0.0005001, 2, 3600.25)]).splitlines()
    assert [line.split()[1] for line in lines[1:]] == ["0.000s", "0.000s", "0.001s", "2.000s", "3600.250s"]


def test_long_paths_are_cut() -> None:
    long_path = "/files/" + "a" * 100
    lines = table([{**RECORD, "path": long_path}, {**RECORD, "path": "/" + "b" * 59}]).splitlines()
    assert lines[1].split()[5] == long_path[:57] + "..."
    assert lines[2].split()[5] == "/" + "b" * 59  # 60 characters: whole
    assert len({line.index(RECORD["id"]) for line in lines[1:]}) == 1
    assert lines[0].index("ID") == lines[1].index(RECORD["id"])


@pytest.mark.parametrize(
    ("path", "cell"),
    [
        ("/a\nb", "/a\\nb"),
        ("/a\tb\r", "/a\\tb\\r"),
        ("/\x1b[31mred\x1b[0m", "/\\x1b[31mred\\x1b[0m"),
        ("/\x00\x7f\x85", "/\\x00\\x7f\\x85"),
        ("/\u202egnp.exe", "/\\u202egnp.exe"),  # right-to-left override
        ("/\ud800", "/\\ud800"),  # a lone surrogate, which stdout could not encode
        ("/caf\u00e9/\u65e5\u672c", "/caf\u00e9/\u65e5\u672c"),  # printable: as it is
        ("/a b\\c", "/a b\\c"),
    ],
)
def test_control_characters_are_escaped(path: str, cell: str) -> None:
    assert shown(path) == cell
    assert table([{**RECORD, "path": path}]).splitlines()[1].split("  ")[-2].strip() == cell


def test_cutting_never_splits_an_escape() -> None:
    assert shown("/" + "a" * 54 + "\x1b" * 3, 60) == "/" + "a" * 54 + "..."
    assert shown("/" + "a" * 52 + "\x1b" * 3, 60) == "/" + "a" * 52 + "\\x1b..."
    assert len(shown("\n" * 100, 60)) == 59


def test_every_cell_is_escaped() -> None:
    record = {**RECORD, "id": "x\ny", "method": "G\x1bT", "outcome": "o\tk", "started": "\r"}
    assert table([record]).count("\n") == 2
    assert "\x1b" not in table([record])


# -- running it ------------------------------------------------------------------------


class Server:
    """Stands in for control_call.call: answers ``status`` and ``body``, keeps what was asked."""

    def __init__(self, body: str = "[]", status: int = 200) -> None:
        self.body, self.status = body, status
        self.asked: list[tuple[str, str, str]] = []

    def __call__(
        self, context: object, control_url: str, method: str, path: str, body: object, expected: int
    ) -> str:
        self.asked.append((control_url, method, path))
        if self.status != expected:
            raise control_call.ControlError.refused(self.body.encode(), self.status)
        return self.body


@pytest.fixture
def answer(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Server]]:
    monkeypatch.setattr(control, "context", lambda directory, environ: None)

    def answering(body: str = "[]", status: int = 200) -> Server:
        server = Server(body, status)
        monkeypatch.setattr(control_call, "call", server)
        return server

    yield answering


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = history_command.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_prints_the_table(answer: Callable[..., Server], capsys: pytest.CaptureFixture[str]) -> None:
    server = answer(json.dumps([RECORD, KILLED]))
    assert run(capsys, "--outcome", "error", "--control-url", "https://ctl:8081") == (
        0,
        table([RECORD, KILLED]),
        "",
    )
    assert server.asked == [("https://ctl:8081", "GET", "/history?outcome=error")]


def test_prints_the_json_as_sent(answer: Callable[..., Server], capsys: pytest.CaptureFixture[str]) -> None:
    body = json.dumps([RECORD, KILLED])
    answer(body)
    assert run(capsys, "--json") == (0, body + "\n", "")
    answer("[]\n")
    assert run(capsys, "--json", "--limit", "1") == (0, "[]\n", "")


def test_prints_one_record_as_json(answer: Callable[..., Server], capsys: pytest.CaptureFixture[str]) -> None:
    body = json.dumps({**RECORD, "job": True, "stderr_tail": "boom\n", "truncated": False})
    server = answer(body)
    assert run(capsys, RECORD["id"]) == (0, body + "\n", "")
    assert server.asked[-1][1:] == ("GET", "/history/" + RECORD["id"])


def test_through_the_kapow_command(answer: Callable[..., Server], capsys: pytest.CaptureFixture[str]) -> None:
    server = answer(json.dumps([RECORD]))
    assert cli.main(["kapow", "history", "--route", "r"]) == 0
    assert capsys.readouterr().out == table([RECORD])
    assert server.asked[-1][2] == "/history?route_id=r"
    assert cli.main(["kapow", "--help"]) == 0
    assert "  history " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "status", "body", "line"),
    [
        (("--limit", "0"), 400, '{"reason": "Invalid Query"}', "kapow: Invalid Query\n"),
        (("nope",), 404, '{"reason": "Run Not Found"}', "kapow: Run Not Found\n"),
        (("--json",), 502, "<html>Bad Gateway</html>", "kapow: HTTP 502\n"),
    ],
)
def test_the_servers_refusal(
    answer: Callable[..., Server],
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    status: int,
    body: str,
    line: str,
) -> None:
    answer(body, status)
    assert run(capsys, *argv) == (1, "", line)


def test_a_connection_failure(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(control, "context", lambda directory, environ: None)

    def refused(*args: object) -> str:
        raise control_call.ControlError(
            "cannot reach control API at https://localhost:8081: Connection refused"
        )

    monkeypatch.setattr(control_call, "call", refused)
    assert run(capsys, "--outcome", "ok") == (
        1,
        "",
        "kapow: cannot reach control API at https://localhost:8081: Connection refused\n",
    )


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ("--limit", "abc"),
            "kapow history: argument --limit: invalid int value: 'abc' (see kapow history --help)\n",
        ),
        (
            ("--since", "soon"),
            "kapow history: argument --since: not an RFC 3339 time: 'soon' (see kapow history --help)\n",
        ),
    ],
)
def test_a_bad_value_asks_nothing(
    answer: Callable[..., Server], capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], line: str
) -> None:
    server = answer()
    assert run(capsys, *argv) == (1, "", line)
    assert server.asked == []


def test_missing_credentials_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, err = run(capsys, "--control-credentials", str(tmp_path / "none"))
    assert (status, out) == (1, "")
    assert err.startswith("kapow history: ") and "server.crt" in err and err.count("\n") == 1


@pytest.mark.parametrize("body", ["not json", '{"id": "x"}', "[1, 2]", '"text"'])
def test_an_answer_that_is_not_a_list_of_records(
    answer: Callable[..., Server], capsys: pytest.CaptureFixture[str], body: str
) -> None:
    answer(body)
    status, out, err = run(capsys)
    assert (status, out) == (1, "")
    assert err.startswith("kapow history: the control API answered something other than ")
    assert err.count("\n") == 1


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        _parse(["--help"])
    assert caught.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--route ID",
        "--outcome OUTCOME",
        "ok, error, signal, timeout, disconnect, killed",
        "--since TIME",
        "--limit N",
        "--json",
        "--control-url",
        "--control-credentials DIR",
        "[ID]",
    ):
        assert flag in text
