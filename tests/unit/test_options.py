"""
The options of ``kapow server`` (kapow.server.options): defaults as the
reference's, every value coerced as it is read, one line for each bad
value, options read wherever they stand, boolean values, listener
addresses, and the help that shows them (kapow.server.help_text).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from twisted.application.twist._options import TwistOptions
from twisted.python.usage import UsageError
from twisted.scripts.twistd import ServerOptions

from kapow.server import help_text
from kapow.server.options import (
    HISTORY_OFF,
    Options,
    control_reachable_addr,
    history_path,
    parse_listen_address,
)
from kapow.server.service import StartupError

DEFAULTS = {
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
    "history": None,
    "history-keep": 10_000,
    "job-output-max": 1 << 20,
    "jobs-path": "/_jobs",
    "server-name": socket.gethostname(),
    "metrics-bind": None,
    "init_programs": [],
}


def parsed(*args: str) -> dict:
    options = Options()
    options.parseOptions(list(args))
    return dict(options)


def refusal(*args: str) -> str:
    with pytest.raises(UsageError) as caught:
        parsed(*args)
    return str(caught.value)


def test_defaults_are_the_reference_ones() -> None:
    assert parsed() == DEFAULTS


def test_every_value_is_coerced_as_it_is_read() -> None:
    options = parsed(
        "--bind", "haproxy:127.0.0.1:9080", "--control-bind", "[::1]:9081", "--data-bind", "unix:/run/k.sock",
        "--control-reachable-addr", "kapow.example:443", "--metrics-bind", ":9090",
        "--certfile", "c.pem", "--keyfile", "k.pem", "--clientauth", "--clientcafile", "ca.pem",
        "--control-credentials", "creds", "--write-control-credentials", "out", "--data-client", "python",
        "--debug", "--keep-running-on-disconnect",
        "--handler-timeout", "2.5", "--kill-grace", "0", "--max-handlers", "8", "--queue", "7",
        "--queue-timeout", "1.5", "--shutdown-timeout", "10", "--limit", "memory=256M", "--limit", "cpu=3",
        "--workers", "3", "--worker", "2", "--header-timeout", "1.5", "--idle-timeout", "2",
        "--body-min-rate", "64", "--backlog", "128", "--max-connections", "10",
        "--trusted-proxies", "127.0.0.1/32,::1", "--history", "h.sqlite3", "--history-keep", "5",
        "--job-output-max", "2K", "--jobs-path", "/jobs/", "--server-name", "a",
        "a.pow", "b.pow",
    )  # fmt: skip
    trusted = options.pop("trusted-proxies")
    assert options == {
        "bind": "haproxy:127.0.0.1:9080",
        "control-bind": "[::1]:9081",
        "data-bind": "unix:/run/k.sock",
        "control-reachable-addr": "kapow.example:443",
        "metrics-bind": ":9090",
        "certfile": "c.pem",
        "keyfile": "k.pem",
        "clientauth": 1,
        "clientcafile": "ca.pem",
        "control-credentials": "creds",
        "write-control-credentials": "out",
        "data-client": "python",
        "debug": 1,
        "keep-running-on-disconnect": 1,
        "handler-timeout": 2.5,
        "kill-grace": 0.0,
        "max-handlers": 8,
        "queue": 7,
        "queue-timeout": 1.5,
        "shutdown-timeout": 10.0,
        "limits": {"memory": 256 << 20, "cpu": 3},
        "workers": 3,
        "worker": 2,
        "header-timeout": 1.5,
        "idle-timeout": 2.0,
        "body-min-rate": 64.0,
        "backlog": 128,
        "max-connections": 10,
        "history": "h.sqlite3",
        "history-keep": 5,
        "job-output-max": 2048,
        "jobs-path": "/jobs",
        "server-name": "a",
        "init_programs": ["a.pow", "b.pow"],
    }
    assert [str(network) for network in trusted] == ["127.0.0.1/32", "::1/128"]
    types = {name: type(options[name]) for name in ("kill-grace", "max-handlers", "queue", "backlog")}
    assert types == {"kill-grace": float, "max-handlers": int, "queue": int, "backlog": int}


def test_the_command_line_is_kept_for_the_workers() -> None:
    options = Options()
    options.parseOptions(["--workers", "2", "--bind", ":9"])
    assert options.argv == ["--workers", "2", "--bind", ":9"]


def test_a_repeated_limit_keeps_the_last_value_and_options_share_nothing() -> None:
    assert parsed("--limit", "memory=1M", "--limit", "file_size=2k", "--limit", "memory=2K")["limits"] == {
        "memory": 2048,
        "file_size": 2048,
    }
    assert parsed()["limits"] == {}


def test_workers_auto_is_the_cpus_this_process_may_use() -> None:
    assert parsed("--workers", "auto")["workers"] == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "flag", ["--header-timeout", "--idle-timeout", "--body-min-rate", "--backlog", "--max-connections"]
)
@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "abc", "nan", "inf", ""])
def test_abuse_limits_must_be_positive_numbers(flag: str, value: str) -> None:
    assert refusal(flag, value) == f"{flag} must be a positive number, not {value!r}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backlog", "1.5"], "--backlog must be a positive number, not '1.5'"),
        (["--max-connections", "1.5"], "--max-connections must be a positive number, not '1.5'"),
        (["--handler-timeout", "0"], "--handler-timeout must be at least 0.001"),
        (["--handler-timeout", "soon"], "--handler-timeout must be a number, not 'soon'"),
        (["--max-handlers", "0"], "--max-handlers must be at least 1"),
        (["--max-handlers", "1.5"], "--max-handlers must be a number, not '1.5'"),
        (["--kill-grace", "-1"], "--kill-grace must be at least 0"),
        (["--shutdown-timeout", "nan"], "--shutdown-timeout must be at least 0"),
        (["--queue", "-1"], "--queue must be at least 0"),
        (["--queue", "1.5"], "--queue must be a number, not '1.5'"),
        (["--queue", "99999999"], "--queue must be at most 1000000"),
        (["--queue-timeout", "0"], "--queue-timeout must be at least 0.001"),
        (["--queue-timeout", "inf"], "--queue-timeout must be at least 0.001"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--workers", "x"], "--workers must be a number or auto, not 'x'"),
        (["--data-client", "c"], "--data-client must be auto, native or python, not 'c'"),
        (
            ["--trusted-proxies", "bogus"],
            "--trusted-proxies: bad network 'bogus': 'bogus' does not appear to be an IPv4 or IPv6 network",
        ),
        (
            ["--limit", "stack=1"],
            "--limit 'stack=1': unknown limit 'stack' (known: memory, cpu, open_files, file_size, processes)",
        ),
        (["--certfile", "c"], "--certfile and --keyfile go together"),
        (["--keyfile", "k"], "--certfile and --keyfile go together"),
        (["--clientauth"], "--clientauth needs HTTPS: give --certfile and --keyfile"),
        (["--clientcafile", "ca", "--certfile", "c", "--keyfile", "k"], "--clientcafile needs --clientauth"),
        (["--bind", "nonsense"], "invalid address 'nonsense': expected HOST:PORT or an endpoint description"),
        (
            ["--data-bind", "ssl:8443"],
            "'ssl:8443': TLS comes from --certfile/--keyfile, not from an ssl: endpoint",
        ),
        (
            ["--control-bind", "unix:/run/kapow.sock"],
            "--control-bind must be a TCP address: kapow route reaches it over TCP",
        ),
        (["--metrics-bind", "haproxy:tcp:9090"], "--metrics-bind: the PROXY protocol is for --bind only"),
        (
            ["--data-bind", "haproxy:127.0.0.1:8082", "--workers", "2"],
            "--data-bind haproxy: needs --workers 1",
        ),
        (["--metrics-bind", "a:70000"], "invalid address 'a:70000': port out of range"),
        (
            ["--control-reachable-addr", "noport"],
            "control reachable address 'noport': missing port; expected host:port",
        ),
    ],
)
def test_a_bad_value_is_refused_in_one_line(args: list[str], message: str) -> None:
    assert refusal(*args) == message


def test_the_native_client_only_if_it_was_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kapow.server.options.native_client", lambda: None)  # as when no compiler was there
    assert refusal("--data-client", "native") == (
        "--data-client native: the native client was not built (no C compiler at install?)"
    )
    assert parsed("--data-client", "auto")["data-client"] == "auto"


def test_the_help_states_each_default_once_in_its_own_words() -> None:
    usage = " ".join(Options().getUsage(width=1000).split())
    assert "ending a handler [default: 3]." in usage
    assert "[default: 3.0]" not in usage and "[default: 30.0]" not in usage
    assert "User interface address. [default: 0.0.0.0:8080]" in usage
    assert "--worker=" not in usage and "--workers=" in usage  # the workers' own option stays internal


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
        ("haproxy:127.0.0.1:80", "haproxy:tcp:port=80:interface=127.0.0.1", "127.0.0.1"),
    ],
)
def test_listen_addresses(addr: str, description: str, host: str | None) -> None:
    assert parse_listen_address(addr) == (description, host)


@pytest.mark.parametrize(
    "addr",
    [
        "",
        "8080",
        "host:",
        "host:port",
        "[nothex]:1",
        "a:70000",
        "[::1",
        "ssl:8443",
        "tls:8443",
        "haproxy:systemd:x",
    ],
)
def test_bad_listen_addresses(addr: str) -> None:
    with pytest.raises(StartupError):
        parse_listen_address(addr)


@pytest.mark.parametrize(
    ("args", "reachable"),
    [
        ([], "localhost:8081"),
        (["--control-bind", "0.0.0.0:9001"], "localhost:9001"),
        (["--control-bind", "[::]:9001"], "localhost:9001"),
        (["--control-bind", "[::1]:9001"], "[::1]:9001"),
        (["--control-bind", "10.0.0.7:9001"], "10.0.0.7:9001"),
        (["--control-bind", "tcp:9001"], "localhost:8081"),
        (
            ["--control-bind", "[::1]:9001", "--control-reachable-addr", "kapow.example:443"],
            "kapow.example:443",
        ),
    ],
)
def test_where_init_programs_reach_the_control_api(args: list[str], reachable: str) -> None:
    options = Options()
    options.parseOptions(args)
    assert control_reachable_addr(options) == reachable


def test_the_history_lives_where_systemd_keeps_state_unless_told() -> None:
    state = {"STATE_DIRECTORY": "/var/lib/kapow:/var/lib/other"}
    assert history_path(parsed(), state) == "/var/lib/kapow/history.sqlite3"
    assert history_path(parsed(), {}) is None  # in memory
    assert history_path(parsed("--history", "/tmp/h.db"), state) == "/tmp/h.db"
    assert history_path(parsed("--history", "off"), state) == HISTORY_OFF
    assert refusal("--history", " ") == "--history: give a database file, or off"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--job-output-max", "lots"), "--job-output-max: invalid size 'lots'"),
        (("--job-output-max", "-1"), "--job-output-max: invalid size '-1'"),
        (("--jobs-path", "jobs"), "--jobs-path must be a path such as /_jobs, not 'jobs'"),
    ],
)
def test_bad_job_options_are_refused(args: tuple[str, ...], message: str) -> None:
    assert refusal(*args).startswith(message)


# -- where options stand ---------------------------------------------------------


def test_options_are_read_wherever_they_stand_among_the_init_programs() -> None:
    options = parsed("prog1", "--bind", "127.0.0.1:9", "prog2", "--debug", "--kill-grace=1")
    assert (options["bind"], options["debug"], options["kill-grace"]) == ("127.0.0.1:9", 1, 1.0)
    assert options["init_programs"] == ["prog1", "prog2"]


def test_a_double_dash_ends_the_options() -> None:
    options = parsed("prog1", "--", "--bind", "127.0.0.1:9", "--bnd", "-", "--")
    assert options["bind"] == "0.0.0.0:8080"
    assert options["init_programs"] == ["prog1", "--bind", "127.0.0.1:9", "--bnd", "-", "--"]


def test_a_lone_dash_is_an_init_program_and_a_value_may_look_like_an_option() -> None:
    options = parsed("-", "--server-name", "--debug")
    assert (options["init_programs"], options["server-name"], options["debug"]) == (["-"], "--debug", 0)


def test_the_workers_get_the_command_line_as_given() -> None:
    argv = ["prog", "--workers", "2", "--debug", "false", "--", "--bind"]
    options = Options()
    options.parseOptions(argv)
    assert options.argv == argv
    worker = Options()
    worker.parseOptions(["--worker", "1", *argv])
    assert dict(worker) == {**dict(options), "worker": 1}


@pytest.mark.parametrize(
    "args",
    [
        ["--bnd", "x"],
        ["prog", "--bnd"],
        ["--debug", "--bnd=x", "prog"],
        ["prog1", "prog2", "--bnd=x", "--", "prog3"],
    ],
)
def test_an_unknown_option_is_refused_wherever_it_stands(args: list[str]) -> None:
    assert refusal(*args) == "option --bnd not recognized"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x"], "option -x not recognized"),
        (["prog", "-x"], "option -x not recognized"),
        (["--bi", ":9"], "option --bi not recognized"),  # no abbreviations, as in the reference
        (["--work", "2"], "option --work not recognized"),
        (["--log-format=text"], "option --log-format not recognized"),
        (["--bind"], "option --bind requires argument"),
        (["prog", "--bind"], "option --bind requires argument"),
        (["--help=yes"], "option --help must not have an argument"),
    ],
)
def test_a_misused_option_is_refused_in_one_line(args: list[str], message: str) -> None:
    assert refusal(*args) == message


# -- boolean options -------------------------------------------------------------

HTTPS = ("--certfile", "c.pem", "--keyfile", "k.pem")


@pytest.mark.parametrize("value", ["1", "t", "T", "TRUE", "true", "True"])
@pytest.mark.parametrize("flag", ["clientauth", "debug", "keep-running-on-disconnect"])
def test_a_boolean_option_takes_go_s_spellings_of_true(flag: str, value: str) -> None:
    assert parsed(*HTTPS, f"--{flag}={value}")[flag] == 1


@pytest.mark.parametrize("value", ["0", "f", "F", "FALSE", "false", "False"])
@pytest.mark.parametrize("flag", ["clientauth", "debug", "keep-running-on-disconnect"])
def test_a_boolean_option_takes_go_s_spellings_of_false(flag: str, value: str) -> None:
    assert parsed(f"--{flag}={value}")[flag] == 0


@pytest.mark.parametrize("value", ["", "yes", "on", "tRUE", "2"])
def test_any_other_boolean_value_is_refused(value: str) -> None:
    assert refusal(f"--clientauth={value}") == f"--clientauth must be true or false, not {value!r}"


def test_the_last_value_of_a_boolean_option_wins() -> None:
    assert parsed("--debug", "--debug=false")["debug"] == 0
    assert parsed("--debug=0", "prog", "--debug")["debug"] == 1


def test_a_lone_true_or_false_after_a_boolean_option_is_its_value() -> None:
    options = parsed(*HTTPS, "--clientauth", "true", "--clientcafile", "ca.pem", "awesome-route")
    assert (options["clientauth"], options["clientcafile"]) == (1, "ca.pem")
    assert options["init_programs"] == ["awesome-route"]
    assert parsed("--debug", "false", "prog")["debug"] == 0
    assert parsed("--debug", "false", "prog")["init_programs"] == ["prog"]


@pytest.mark.parametrize(
    ("args", "programs"),
    [
        (["--debug", "TRUE"], ["TRUE"]),  # only the words true and false
        (["--debug=true", "true"], ["true"]),  # the value was given
        (["true", "--debug"], ["true"]),
    ],
)
def test_other_words_near_a_boolean_option_are_init_programs(args: list[str], programs: list[str]) -> None:
    options = parsed(*args)
    assert (options["debug"], options["init_programs"]) == (1, programs)


def test_the_reference_s_documented_tls_commands() -> None:
    for args in (
        ["--keyfile", "key.pem", "--certfile", "cert.pem", "--clientauth=true", "--clientcafile", "clientca.pem", "foobar-route"],
        ["--certfile", "c", "--keyfile", "k", "--clientauth", "true", "--clientcafile", "ca", "awesome-route"],
    ):  # fmt: skip
        options = parsed(*args)
        assert options["clientauth"] == 1 and options["clientcafile"] == args[-2]
        assert options["init_programs"] == args[-1:]
    assert refusal("--certfile", "c", "--keyfile", "k", "--clientauth=false", "--clientcafile", "ca") == (
        "--clientcafile needs --clientauth"
    )


# -- under twist and twistd ------------------------------------------------------


@pytest.fixture
def twist_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runners name themselves from ``sys.argv[0]``."""
    monkeypatch.setattr(sys, "argv", [str(Path(sys.executable).with_name("twist"))])


@pytest.mark.parametrize(
    ("args", "written"),
    [
        (["--log-format=text"], "--log-format=text"),
        (["prog", "--log-format", "json"], "--log-format=json"),
        (["--log-level", "debug"], "--log-level=debug"),
        (["--log-file=-"], "--log-file=-"),
        (["--reactor", "epoll"], "--reactor=epoll"),
    ],
)
def test_twist_s_own_options_after_the_plugin_name_say_where_they_go(
    twist_argv: None, args: list[str], written: str
) -> None:
    with pytest.raises(UsageError) as caught:
        TwistOptions().parseOptions(["kapow", *args])
    name = written.split("=")[0]
    assert str(caught.value) == (
        f"option {name} is twist's own: put it before the plugin name (twist {written} kapow ...)"
    )


def test_twistd_s_own_options_after_the_plugin_name_say_where_they_go() -> None:
    with pytest.raises(UsageError) as caught:
        ServerOptions().parseOptions(["kapow", "--nodaemon"])
    assert str(caught.value) == (
        "option --nodaemon is twistd's own: put it before the plugin name (twistd --nodaemon kapow ...)"
    )


def test_an_unknown_option_under_twist_is_just_unknown(twist_argv: None) -> None:
    with pytest.raises(UsageError) as caught:
        TwistOptions().parseOptions(["kapow", "prog", "--bnd=x"])
    assert str(caught.value) == "option --bnd not recognized"


# -- the help ----------------------------------------------------------------------


def printed_help(runner: TwistOptions | None, args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        (runner or Options()).parseOptions(args)
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["prog", "--bind", ":9", "--help"]])
def test_the_prerendered_help_is_what_the_options_print(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    monkeypatch.setenv("COLUMNS", str(help_text.WIDTH))
    assert printed_help(None, args, capsys) == help_text.HELP  # else: help_text.regenerate()
    assert help_text.HELP.startswith("Usage: kapow server [options] [INIT_PROGRAM ...]\n")
    assert "  -h, --help " in help_text.HELP


def test_the_usage_line_under_twist_names_twist_and_the_plugin(
    twist_argv: None, capsys: pytest.CaptureFixture[str]
) -> None:
    shown = printed_help(TwistOptions(), ["kapow", "--help"], capsys)
    assert shown.splitlines()[0] == "Usage: twist [options] kapow [options] [INIT_PROGRAM ...]"


def test_regenerate_rewrites_a_stale_help(tmp_path: Path) -> None:
    module = tmp_path / "help_text.py"
    shutil.copy(help_text.__file__, module)
    source = module.read_text()
    module.write_text(source.replace("  -h, --help ", "  --stale   "))
    help_text.regenerate(str(module))
    assert module.read_text() == source.replace(help_text.HELP, help_text.rendered())
