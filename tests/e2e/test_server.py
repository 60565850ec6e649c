"""
The server as an operator meets it: started as a real process, driven by the
real ``kapow`` CLI and curl over pinned mutual TLS.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.kapowserver import KAPOW, TWIST, KapowServer, curl, wait_for, write_program


def test_control_api_calls_with_curl(server: KapowServer) -> None:
    listed = server.curl_control(server.control + "/routes")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []

    first = server.curl_control(
        "-X", "POST", "--data", '{"method": "GET", "url_pattern": "/a", "command": "true"}',
        "-w", "%{http_code}", server.control + "/routes",
    )  # fmt: skip
    assert first.stdout.endswith("201")
    route_a = json.loads(first.stdout[:-3])
    assert route_a["index"] == 0 and route_a["entrypoint"] == "/bin/sh -c"

    inserted = server.curl_control(
        "-X", "PUT", "--data", '{"method": "POST", "url_pattern": "/b", "index": 0}',
        server.control + "/routes",
    )  # fmt: skip
    route_b = json.loads(inserted.stdout)
    assert route_b["index"] == 0

    listed = json.loads(server.curl_control(server.control + "/routes").stdout)
    assert [(r["url_pattern"], r["index"]) for r in listed] == [("/b", 0), ("/a", 1)]

    got = server.curl_control(server.control + "/routes/" + route_a["id"])
    assert json.loads(got.stdout) == {**route_a, "index": 1}

    deleted = server.curl_control(
        "-X", "DELETE", "-w", "%{http_code}", server.control + "/routes/" + route_b["id"]
    )
    assert deleted.stdout == "204"
    missing = server.curl_control("-w", "%{http_code}", server.control + "/routes/" + route_b["id"])
    assert missing.stdout == '{"reason": "Route Not Found"}404'


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("-X", "POST", "--data", "{nope"),
            '{"reason": "Malformed JSON", "detail": "invalid JSON at line 1, column 2 (char 1):'
            ' expecting property name enclosed in double quotes"}400',
        ),
        (
            ("-X", "POST", "--data", '{"method": "GET"}'),
            '{"reason": "Invalid Route", "detail": "url_pattern is missing"}422',
        ),
        (
            ("-X", "PUT", "--data", '{"method": "GET", "url_pattern": "/x", "index": -1}'),
            '{"reason": "Invalid Route", "detail": "index must be a whole number >= 0, not -1"}422',
        ),
        (
            (
                "-X",
                "PATCH",
            ),
            '{"reason": "Method Not Allowed"}405',
        ),
    ],
)
def test_control_api_errors_over_mtls(server: KapowServer, args: tuple[str, ...], expected: str) -> None:
    result = server.curl_control(*args, "-w", "%{http_code}", server.control + "/routes")
    assert result.stdout == expected


def test_control_refuses_clients_without_the_pinned_certificate(server: KapowServer, tmp_path: Path) -> None:
    no_cert = curl("--cacert", str(server.creds / "server.crt"), server.control + "/routes")
    assert no_cert.returncode != 0 and no_cert.stdout == ""

    other = tmp_path / "other"
    made = subprocess.run([KAPOW, "control-credentials", str(other)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    foreign = curl(
        "--cert", str(other / "client.crt"), "--key", str(other / "client.key"),
        "--cacert", str(server.creds / "server.crt"), server.control + "/routes",
    )  # fmt: skip
    assert foreign.returncode != 0 and foreign.stdout == ""


def test_route_cli_from_an_operator_shell(server: KapowServer, tmp_path: Path) -> None:
    added = server.kapow("route", "add", "-X", "POST", "/echo/{name}", "-c", "echo hi")
    assert added.returncode == 0, added.stderr
    route = json.loads(added.stdout)
    assert (route["method"], route["url_pattern"], route["command"]) == ("POST", "/echo/{name}", "echo hi")

    heredoc = server.kapow("route", "add", "/heredoc", "-", input="echo one\necho two\n")
    assert json.loads(heredoc.stdout)["command"] == "echo one\necho two\n"

    script = tmp_path / "cmd.sh"
    script.write_text("echo from file\n")
    from_file = server.kapow("route", "add", "/file", str(script), "--index", "0")
    assert json.loads(from_file.stdout)["index"] == 0

    listing = json.loads(server.kapow("route", "list").stdout)
    assert [r["url_pattern"] for r in listing] == ["/file", "/echo/{name}", "/heredoc"]
    assert json.loads(server.kapow("route", "get", route["id"]).stdout)["id"] == route["id"]

    removed = server.kapow("route", "remove", route["id"])
    assert (removed.returncode, removed.stdout) == (0, "")
    again = server.kapow("route", "remove", route["id"])
    assert (again.returncode, again.stdout, again.stderr) == (1, "", "kapow: Route Not Found\n")

    invalid = server.kapow("route", "add", "no-slash", "-c", "true")
    assert (invalid.returncode, invalid.stderr) == (
        1,
        "kapow: Invalid Route: url_pattern 'no-slash' does not start with '/'\n",
    )


def test_route_cli_reports_connection_and_tls_errors(server: KapowServer, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"https://127.0.0.1:{s.getsockname()[1]}"
    refused = server.kapow("route", "list", "--control-url", closed)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("kapow: cannot reach control API") and refused.stderr.count("\n") == 1

    other = tmp_path / "other"
    subprocess.run([KAPOW, "control-credentials", str(other)], check=True)
    foreign = server.kapow("route", "list", "--control-credentials", str(other))
    assert foreign.returncode == 1 and foreign.stdout == "" and foreign.stderr.count("\n") == 1


def test_init_programs_get_the_environment_and_add_routes(start_server, tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    program = write_program(
        tmp_path / "init.pow",
        f"""#!/bin/sh
kapow route add /from-init -c 'echo hi | kapow set /response/body' || exit 3
python3 - <<'PYEND' > {out}
import json, os
print(json.dumps({{k: v for k, v in os.environ.items() if k.startswith("KAPOW_")}}))
PYEND
echo init says hello
echo init warns >&2
""",
    )
    server = start_server(program)
    server.wait_log(r"init\.pow exited with status 0")
    server.wait_log(r"init\.pow \(stderr\): init warns")
    assert not any("init says hello" in line for line in server.lines)  # stdout: with --debug only
    env = json.loads(out.read_text())
    assert env["KAPOW_CONTROL_URL"] == server.control
    assert env["KAPOW_DATA_URL"] == server.data
    assert env["KAPOW_CONTROL_SERVER_CERT"] == (server.creds / "server.crt").read_text()
    assert env["KAPOW_CONTROL_CLIENT_CERT"] == (server.creds / "client.crt").read_text()
    assert "BEGIN" in env["KAPOW_CONTROL_CLIENT_KEY"]
    routes = json.loads(server.kapow("route", "list").stdout)
    assert [r["url_pattern"] for r in routes] == ["/from-init"]


def test_failing_and_missing_init_programs_are_logged(start_server, tmp_path: Path) -> None:
    failing = write_program(tmp_path / "fail.pow", "#!/bin/sh\necho oops >&2\nexit 7\n")
    plain = tmp_path / "plain.pow"
    plain.write_text("#!/bin/sh\n")
    server = start_server(failing, str(tmp_path / "missing.pow"), str(plain))
    server.wait_log(r"fail\.pow \(stderr\): oops")
    server.wait_log(r"fail\.pow exited with status 7")
    server.wait_log(r"init program \S*missing\.pow not found")
    server.wait_log(r"init program \S*plain\.pow is not executable")
    assert server.curl_control(server.control + "/routes").stdout == "[]"


@pytest.mark.parametrize(
    "command",
    [
        [TWIST, "--log-format=text", "kapow"],
        [str(Path(TWIST).with_name("twistd")), "--nodaemon", "--pidfile=", "--logfile=-", "kapow"],
    ],
    ids=["twist", "twistd"],
)
def test_twist_and_twistd_start_the_same_service(start_server, command: list[str]) -> None:
    server = start_server(command=command)
    assert server.curl_control(server.control + "/routes").stdout == "[]"
    assert curl("-w", "%{http_code}", "-o", "/dev/null", server.user + "/nothing").stdout == "404"
    assert server.stop() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--certfile", "x.pem"], "--certfile and --keyfile go together"),
        (["--clientauth"], "--clientauth needs HTTPS"),
        (["--bind", "not an address"], "invalid address"),
        (["--data-bind", "127.0.0.1:99999"], "port out of range"),
        (["--control-credentials", "/nonexistent"], "control credentials"),
    ],
)
def test_bad_flags_stop_the_start_with_one_line(args: list[str], message: str) -> None:
    result = subprocess.run([KAPOW, "server", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_port_in_use_stops_the_start_with_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for command in ([KAPOW, "server"], [TWIST, "kapow"]):
            result = subprocess.run(
                [*command, "--bind", "127.0.0.1:0", "--control-bind", f"127.0.0.1:{port}", "--data-bind", "127.0.0.1:0"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert result.returncode == 1
            lines = [line for line in result.stderr.splitlines() if line]
            assert lines == [
                f"kapow server: control interface: cannot listen on 127.0.0.1:{port}: Address already in use"
            ]


def test_operator_supplied_credentials_survive_a_restart(start_server, tmp_path: Path) -> None:
    persistent = tmp_path / "persistent"
    made = subprocess.run(
        [KAPOW, "control-credentials", str(persistent), "--control-reachable-addr", "127.0.0.1:1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert oct(persistent.stat().st_mode & 0o777) == "0o700"
    assert all(oct((persistent / n).stat().st_mode & 0o777) == "0o600" for n in ("server.key", "client.key"))
    for _ in range(2):
        server = start_server(extra=("--control-credentials", str(persistent)))
        result = curl(
            "--cert", str(persistent / "client.crt"), "--key", str(persistent / "client.key"),
            "--cacert", str(persistent / "server.crt"), server.control + "/routes",
        )  # fmt: skip
        assert result.stdout == "[]", result.stderr
        server.stop()


def test_written_credentials_are_private(server: KapowServer) -> None:
    assert oct(server.creds.stat().st_mode & 0o777) == "0o700"
    for name in ("server.crt", "client.crt", "client.key"):
        assert oct((server.creds / name).stat().st_mode & 0o777) == "0o600"
    assert not (server.creds / "server.key").exists()


def test_version_and_help() -> None:
    version = subprocess.run([KAPOW, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("kapow ")
    every = [["--help"], ["server", "--help"], ["route", "--help"], ["get", "--help"], ["set", "--help"]]
    every += [["unset", "--help"]]
    every += [["route", action, "--help"] for action in ("add", "list", "get", "remove")]
    every += [["control-credentials", "--help"]]
    for args in every:
        shown = subprocess.run([KAPOW, *args], capture_output=True, text=True)
        assert shown.returncode == 0 and "example" in shown.stdout.lower(), args


def test_oversized_control_bodies_are_refused(server: KapowServer) -> None:
    big = b'{"method": "GET", "url_pattern": "/' + b"a" * (2 * 1024 * 1024) + b'"}'
    for framing in ((), ("-H", "Transfer-Encoding: chunked")):
        result = server.curl_control(
            "-X", "POST", "--data-binary", "@-", *framing, "-D", "-", "-w", "%{http_code}",
            server.control + "/routes",
            input=big,
        )  # fmt: skip
        assert b"\r\n\r\nHTTP/1.1 413 Request Entity Too Large\r\n" in b"\r\n\r\n" + result.stdout, result
        refusal = b'{"reason": "Request Entity Too Large", "detail": "the body is over 1048576 bytes"}413'
        assert result.stdout.endswith(b"\r\n\r\n" + refusal), result
    assert server.curl_control(server.control + "/routes").stdout == "[]"


def test_route_add_options_may_follow_the_pattern(server: KapowServer) -> None:
    added = server.kapow(
        "route", "add", "/late", "-X", "POST", "-e", "/bin/bash -c", "-", input="echo late\n"
    )
    assert added.returncode == 0, added.stderr
    route = json.loads(added.stdout)
    assert (route["method"], route["entrypoint"], route["command"]) == ("POST", "/bin/bash -c", "echo late\n")


def test_insert_with_a_null_index_goes_first(server: KapowServer) -> None:
    server.add_route("/a", "true")
    inserted = server.curl_control(
        "-X", "PUT", "--data", '{"method": "GET", "url_pattern": "/b", "index": null}', server.control + "/routes"
    )  # fmt: skip
    assert json.loads(inserted.stdout)["index"] == 0


def test_cli_failures_are_one_line_on_stderr(tmp_path: Path) -> None:
    bare = subprocess.run([KAPOW], capture_output=True, text=True)
    assert (bare.returncode, bare.stdout) == (1, "") and "usage: kapow" in bare.stderr
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    refused = subprocess.run([KAPOW, "control-credentials", str(open_dir)], capture_output=True, text=True)
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr.startswith("kapow control-credentials: ") and refused.stderr.count("\n") == 1


def test_a_long_running_init_program_is_ended_with_the_server(start_server, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    program = write_program(tmp_path / "forever.pow", f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 1000\n")
    server = start_server(program)
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the init program"))
    assert server.stop() == 0
    server.wait_log(r"forever\.pow killed by signal 15")
    try:
        os.kill(pid, 0)
        alive = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except ProcessLookupError:
        alive = False
    assert not alive


def test_init_programs_stdout_is_logged_with_debug(start_server, tmp_path: Path) -> None:
    program = write_program(tmp_path / "init.pow", "#!/bin/sh\necho init says hello\n")
    server = start_server(program, extra=("--debug",))
    server.wait_log(r"init\.pow: init says hello")
