"""Tests for kapow.commands.routes: the JSON body ``kapow route add`` builds from its flags.

Nothing is sent: :func:`kapow.commands.routes._request` gives the request
the command would make. The server decides whether the fields are valid
(tests/unit/test_routes.py, tests/e2e/test_route_modes.py); only values
argparse cannot parse at all are refused here.
"""

from __future__ import annotations

import pytest

from kapow.commands import control, control_call
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
        "kapow route add: argument --max-message: invalid size 'big' "
        "(a whole number of bytes, or with K, M or G) (see kapow route add --help)\n"
    )


def test_help_names_the_new_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(["add", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--mode {http,websocket,events}", "--origin URL", "--messages {lines,binary}",
                 "--max-message BYTES", "--ping S", "--heartbeat S"):  # fmt: skip
        assert flag in text


# --rate, --burst, --rate-key, --cors and the --cors-* flags (SPEC section 13)


@pytest.mark.parametrize(
    ("flags", "fields"),
    [
        (("--rate", "10/s"), {"rate": {"requests": 10, "per": 1}}),
        (("--rate", "100/m"), {"rate": {"requests": 100, "per": 60}}),
        (("--rate", "5/h"), {"rate": {"requests": 5, "per": 3600}}),
        (("--rate", "1/30s"), {"rate": {"requests": 1, "per": 30}}),
        (("--rate", "2/500ms"), {"rate": {"requests": 2, "per": 0.5}}),
        (("--rate", "10/s", "--burst", "20"), {"rate": {"requests": 10, "per": 1, "burst": 20}}),
        (
            ("--rate", "10/s", "--burst", "0"),
            {"rate": {"requests": 10, "per": 1, "burst": 0}},
        ),  # the server refuses it
        (("--rate", "10/s", "--rate-key", "route"), {"rate": {"requests": 10, "per": 1, "key": "route"}}),
        (("--rate", "10/s", "--rate-key", "client"), {"rate": {"requests": 10, "per": 1, "key": "client"}}),
        (("--cors", "https://a.example"), {"cors": {"origins": ["https://a.example"]}}),
        (("--cors", "*"), {"cors": {"origins": ["*"]}}),
        (("--cors", "not-a-url"), {"cors": {"origins": ["not-a-url"]}}),  # the server refuses it
        (
            ("--cors", "https://a.example", "--cors", "http://b.example:8080"),
            {"cors": {"origins": ["https://a.example", "http://b.example:8080"]}},
        ),
        (
            ("--cors", "https://a.example", "--cors-header", "Content-Type", "--cors-header", "X-Token"),
            {"cors": {"origins": ["https://a.example"], "headers": ["Content-Type", "X-Token"]}},
        ),
        (("--cors", "*", "--cors-max-age", "0"), {"cors": {"origins": ["*"], "max_age": 0}}),
        (
            ("--cors", "https://a.example", "--cors-credentials"),
            {"cors": {"origins": ["https://a.example"], "credentials": True}},
        ),
        (
            ("--cors", "*", "--cors-credentials"),
            {"cors": {"origins": ["*"], "credentials": True}},
        ),  # refused there
    ],
)
def test_each_traffic_flag(flags: tuple[str, ...], fields: dict[str, object]) -> None:
    assert body(*flags) == {**BASE, **fields}


def test_per_is_sent_as_a_whole_number_when_it_is_one() -> None:
    rate = body("--rate", "1/30s")["rate"]
    assert isinstance(rate, dict) and type(rate["per"]) is int
    rate = body("--rate", "1/1.5s")["rate"]
    assert isinstance(rate, dict) and rate["per"] == 1.5


def test_every_traffic_flag_together_and_after_the_pattern() -> None:
    args = _parse(
        ["add", "-X", "POST", "/api", "--cors", "https://a.example", "-c", "cat", "--rate", "5/m",
         "--cors-header", "X-A", "--burst", "10", "--cors-max-age", "60", "--rate-key", "route",
         "--cors-credentials", "--cors", "https://b.example"]
    )  # fmt: skip
    assert _request(args)[3] == {
        "method": "POST",
        "url_pattern": "/api",
        "entrypoint": "/bin/sh -c",
        "command": "cat",
        "rate": {"requests": 5, "per": 60, "burst": 10, "key": "route"},
        "cors": {
            "origins": ["https://a.example", "https://b.example"],
            "headers": ["X-A"],
            "max_age": 60,
            "credentials": True,
        },
    }


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--burst", "5"), "--burst needs --rate"),
        (("--rate-key", "route"), "--rate-key needs --rate"),
        (("--cors-header", "X-A"), "--cors-header needs --cors"),
        (("--cors-max-age", "60"), "--cors-max-age needs --cors"),
        (("--cors-credentials",), "--cors-credentials needs --cors"),
        (("--rate", "10/s", "--cors-header", "X-A"), "--cors-header needs --cors"),
    ],
)
def test_dependent_flags_need_their_flag(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(CommandError) as caught:
        body(*flags)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--rate", "banana"), "argument --rate: invalid rate 'banana' (N/UNIT"),
        (("--rate", "0/s"), "argument --rate: invalid rate '0/s': the number of requests must be from 1"),
        (("--rate", "1/0s"), "argument --rate: invalid rate '1/0s': the period must be more than 0 seconds"),
        (("--rate", "10"), "argument --rate: invalid rate '10' (N/UNIT"),
        (("--rate",), "argument --rate: expected one argument"),
        (("--rate", "10/s", "--burst", "lots"), "argument --burst: invalid int value: 'lots'"),
        (("--rate", "10/s", "--rate-key", "ip"), "argument --rate-key: invalid choice: 'ip'"),
        (("--cors",), "argument --cors: expected one argument"),
        (("--cors", "*", "--cors-max-age", "1.5"), "argument --cors-max-age: invalid int value: '1.5'"),
    ],
)
def test_unparseable_traffic_values_are_one_line(flags: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(CommandError) as caught:
        _request(_parse(["add", "/ws", "-c", "cat", *flags]))
    message = str(caught.value)
    assert message.startswith("kapow route add: ") and fragment in message
    assert "\n" not in message


def test_bad_rate_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert route_command.main(["add", "--rate", "0/s", "/api"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "kapow route add: argument --rate: invalid rate '0/s': "
        "the number of requests must be from 1 to 1000000 (see kapow route add --help)\n"
    )
    assert route_command.main(["add", "--burst", "3", "/api"]) == 1
    assert capsys.readouterr().err == "kapow route add: --burst needs --rate (see kapow route add --help)\n"


def test_help_names_the_traffic_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(["add", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--rate N/UNIT", "--burst B", "--rate-key {client,route}", "--cors ORIGIN",
                 "--cors-header NAME", "--cors-max-age S", "--cors-credentials"):  # fmt: skip
        assert flag in text


@pytest.mark.parametrize(
    ("status", "body", "line"),
    [
        (
            422,
            b'{"reason": "Invalid Route", "detail": "unbalanced braces in url_pattern \'/bad/{\'"}',
            "kapow: Invalid Route: unbalanced braces in url_pattern '/bad/{'\n",
        ),
        (422, b'{"reason": "Invalid Route"}', "kapow: Invalid Route\n"),
        (502, b"<html>Bad Gateway</html>", "kapow: HTTP 502\n"),
    ],
)
def test_a_refusal_is_its_reason_and_detail_on_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], status: int, body: bytes, line: str
) -> None:
    def refused(*args: object) -> str:
        raise control_call.ControlError.refused(body, status)

    monkeypatch.setattr(control, "context", lambda directory, environ: None)
    monkeypatch.setattr(control_call, "call", refused)
    assert route_command.main(["add", "/bad/{", "-c", "true"]) == 1
    assert capsys.readouterr() == ("", line)
