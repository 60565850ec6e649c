"""Tests for kapow.commands.routes: the JSON body ``kapow route add`` builds from its flags.

Nothing is sent: :func:`kapow.commands.routes._request` gives the request
the command would make. The server decides whether the fields are valid
(tests/unit/test_routes.py, tests/e2e/test_route_modes.py); only values
argparse cannot parse at all are refused here.
"""

from __future__ import annotations

import pytest

from kapow.commands import routes as route_command
from kapow.commands.control import CommandError
from kapow.commands.routes import _parse, _request

BASE = {"method": "GET", "url_pattern": "/ws", "entrypoint": "/bin/sh -c", "command": "cat"}


def body(*flags: str) -> dict[str, object]:
    _, method, path, payload, status = _request(_parse(["add", *flags, "/ws", "-c", "cat"]))
    assert (method, path, status) == ("POST", "/routes", 201)
    assert isinstance(payload, dict)
    return payload


def test_no_mode_flags_send_no_mode_fields() -> None:
    assert body() == BASE


@pytest.mark.parametrize(
    ("flags", "fields"),
    [
        (("--mode", "http"), {"mode": "http"}),
        (("--mode", "websocket"), {"mode": "websocket"}),
        (("--mode", "events"), {"mode": "events"}),
        (("--origin", "https://a.example"), {"origins": ["https://a.example"]}),
        (("--origin", "https://a.example", "--origin", "*"), {"origins": ["https://a.example", "*"]}),
        (("--origin", "not-a-url"), {"origins": ["not-a-url"]}),  # the server refuses it
        (("--messages", "lines"), {"messages": "lines"}),
        (("--messages", "binary"), {"messages": "binary"}),
        (("--max-message", "100"), {"max_message": 100}),
        (("--max-message", "2K"), {"max_message": 2048}),
        (("--max-message", "2k"), {"max_message": 2048}),
        (("--max-message", "3M"), {"max_message": 3 << 20}),
        (("--max-message", "1G"), {"max_message": 1 << 30}),
        (("--max-message", "0"), {"max_message": 0}),  # the server refuses it
        (("--max-message", "0"), {"max_message": 0}),  # the server refuses it
        (("--ping", "5"), {"ping": 5.0}),
        (("--ping", "0"), {"ping": 0.0}),
        (("--ping", "0.5"), {"ping": 0.5}),
        (("--heartbeat", "15"), {"heartbeat": 15.0}),
        (("--heartbeat", "0"), {"heartbeat": 0.0}),
        (("-X", "POST", "--mode", "events"), {"method": "POST", "mode": "events"}),  # the server refuses it
    ],
)
def test_each_mode_flag(flags: tuple[str, ...], fields: dict[str, object]) -> None:
    assert body(*flags) == {**BASE, **fields}


def test_every_websocket_flag_together_and_after_the_pattern() -> None:
    expected = {
        **BASE,
        "mode": "websocket",
        "origins": ["https://a.example", "http://b.example:8080"],
        "messages": "binary",
        "max_message": 2048,
        "ping": 5.0,
    }
    flags = (
        "--mode", "websocket", "--origin", "https://a.example", "--messages", "binary",
        "--max-message", "2K", "--ping", "5", "--origin", "http://b.example:8080",
    )  # fmt: skip
    assert body(*flags) == expected
    args = _parse(["add", "/ws", "--mode", "websocket", "-c", "cat", "--origin", "https://a.example"])
    assert _request(args)[3] == {**BASE, "mode": "websocket", "origins": ["https://a.example"]}


def test_events_flags_and_insert() -> None:
    _, method, path, payload, _ = _request(
        _parse(["add", "--index", "0", "--mode", "events", "--heartbeat", "2.5", "/ticks"])
    )
    assert (method, path) == ("PUT", "/routes")
    assert payload == {
        "method": "GET",
        "url_pattern": "/ticks",
        "entrypoint": "/bin/sh -c",
        "command": "",
        "mode": "events",
        "heartbeat": 2.5,
        "index": 0,
    }


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--mode", "ws"), "argument --mode: invalid choice: 'ws'"),
        (("--mode", "WebSocket"), "argument --mode: invalid choice"),
        (("--messages", "text"), "argument --messages: invalid choice: 'text'"),
        (("--max-message", "lots"), "argument --max-message: invalid size 'lots'"),
        (("--max-message", "2X"), "argument --max-message: invalid size '2X'"),
        (("--max-message", "K"), "argument --max-message: invalid size 'K'"),
        (("--max-message", "1.5M"), "argument --max-message: invalid size '1.5M'"),
        (("--max-message", ""), "argument --max-message: invalid size ''"),
        (("--ping", "soon"), "argument --ping: invalid float value: 'soon'"),
        (("--heartbeat", "often"), "argument --heartbeat: invalid float value: 'often'"),
        (("--origin",), "argument --origin: expected one argument"),
    ],
)
def test_unparseable_values_are_one_line(flags: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(CommandError) as caught:
        _request(_parse(["add", "/ws", "-c", "cat", *flags]))
    message = str(caught.value)
    assert message.startswith("kapow route add: ") and fragment in message
    assert "\n" not in message


def test_unparseable_value_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert route_command.main(["add", "--max-message", "big", "/ws"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "kapow: kapow route add: argument --max-message: invalid size 'big' "
        "(a whole number of bytes, or with K, M or G)\n"
    )


def test_help_names_the_new_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(["add", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--mode {http,websocket,events}", "--origin URL", "--messages {lines,binary}",
                 "--max-message BYTES", "--ping S", "--heartbeat S"):  # fmt: skip
        assert flag in text
