"""
SPEC.md §7 end to end: a real ``kapow server`` (alone, and with ``--workers
2``), handlers running the native or the Python data client, driven with
``curl``: collections read with ``jq``, ``kapow unset``, reason phrases,
answering early and working on, the body on stdin, and exit status to HTTP
status.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.kapowserver import KapowServer, curl, wait_for, write_program

#: (handlers' data client, extra server arguments) of each server the tests run on.
SERVERS = {
    "native": ("native", ()),
    "python": ("python", ()),
    "workers": ("auto", ("--workers", "2")),
}

INIT = r"""#!/bin/sh
set -e
kapow route add /collections -c 'kapow get /request/params > $STATE/params.json; kapow get /request/headers | jq -c "{rep: .\"x-rep\", agent: (.\"user-agent\" | length)}" | kapow set /response/body'
kapow route add /param -c 'kapow get /request/params/p | kapow set /response/body'
kapow route add /unset - <<'EOF'
kapow set /response/headers/X-Twice one
kapow set /response/headers/X-Twice two
kapow set /response/headers/X-Kept kept
kapow set /response/cookies/session abc
kapow unset /response/headers/X-Twice
kapow unset /response/cookies/session
kapow set /response/body done
kapow unset /response/headers/X-Kept 2> "$STATE/unset-late.err" || echo $? > "$STATE/unset-late.status"
EOF
kapow route add /reason -c 'kapow set /response/status 299; kapow set /response/reason "Fine By Me"; kapow set /response/body ok'
kapow route add -X POST /later - <<'EOF'
kapow set /response/status 202
kapow set /response/headers/Location /jobs/1
kapow set /response/end
sleep 2
kapow get /request/body > "$STATE/later.body"
kapow set /response/body too-late 2> "$STATE/later.err" || true
mv "$STATE/later.body" "$STATE/later.done"
EOF
kapow route add -X POST --stdin body /sum -c 'sha256sum | cut -d" " -f1 | kapow set /response/body'
kapow route add -X POST --stdin body /first -c 'head -c 5 | kapow set /response/body'
kapow route add --buffer --error-status 500 /fail -c 'echo "disk full" | kapow set /response/body; kapow set /response/headers/X-Step 3; exit 3'
kapow route add --error-status 503 /killed -c 'kill -9 $$'
kapow route add --error-status 500 /own -c 'kapow set /response/status 404; exit 1'
kapow route add /wait - <<'EOF'
kapow set /response/headers/X-A one
kapow set /response/headers/X-A two
echo "$KAPOW_HANDLER_ID" > "$STATE/wait.id.new"
mv "$STATE/wait.id.new" "$STATE/wait.id"
while [ ! -e "$STATE/wait.go" ]; do sleep 0.05; done
kapow set /response/body waited
EOF
"""


@pytest.fixture(scope="module", params=sorted(SERVERS))
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[KapowServer, Path]]:
    """A running server with the routes of :data:`INIT`, and the directory its handlers write to."""
    client, extra = SERVERS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    state = tmp / "state"
    state.mkdir()
    init = write_program(tmp / "init.pow", INIT)
    env = dict(os.environ, STATE=str(state))
    server = KapowServer(tmp / "server", [init], ["--data-client", client, *extra], env=env)
    try:
        wait_for(lambda: len(routes(server)) == 11, 20, "the routes")
        if extra:
            wait_for(
                lambda: len(re.findall(r"worker \d+ serves \(", server.output())) >= 2, 20, "the workers"
            )
        yield server, state
    finally:
        server.stop()


def routes(server: KapowServer) -> list:
    result = server.curl_control(server.control + "/routes")
    return json.loads(result.stdout) if result.returncode == 0 else []


def head_and_body(result: subprocess.CompletedProcess | bytes) -> tuple[str, dict[str, list[str]], bytes]:
    """(status line, lower-case headers, body) of what ``curl -i`` wrote."""
    raw = result if isinstance(result, bytes) else result.stdout
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.lower(), []).append(value.strip())
    return status, headers, body


def test_collections_with_repeated_values_through_jq(served: tuple[KapowServer, Path]) -> None:
    server, state = served
    result = curl(server.user + "/collections?a=1&a=2&b=%ff&c", "-H", "X-Rep: 1", "-H", "X-Rep: 2")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"rep": ["1", "2"], "agent": 1}
    params = json.loads((state / "params.json").read_text())
    assert params == {"a": ["1", "2"], "b": ["\ufffd"], "c": [""]}


def test_a_parameter_of_any_bytes(served: tuple[KapowServer, Path]) -> None:
    server, _ = served
    result = curl(server.user + "/param?p=a%ffb&p=second", input=b"")
    assert (result.returncode, result.stdout) == (0, b"a\xffb")


def test_unset_of_a_header_written_twice(served: tuple[KapowServer, Path]) -> None:
    server, state = served
    status, headers, body = head_and_body(curl("-i", server.user + "/unset", input=b""))
    assert status == "HTTP/1.1 200 OK"
    assert "x-twice" not in headers
    assert "set-cookie" not in headers
    assert headers["x-kept"] == ["kept"]
    assert body == b"done"
    wait_for(lambda: (state / "unset-late.status").exists(), 10, "the late unset")
    assert (state / "unset-late.status").read_text() == "1\n"
    assert (state / "unset-late.err").read_text() == "kapow: Response Already Started\n"


def test_a_custom_reason_in_the_status_line(served: tuple[KapowServer, Path]) -> None:
    server, _ = served
    status, _, body = head_and_body(curl("-i", server.user + "/reason", input=b""))
    assert (status, body) == ("HTTP/1.1 299 Fine By Me", b"ok")


def test_answer_now_and_work_on(served: tuple[KapowServer, Path]) -> None:
    server, state = served
    started = time.monotonic()
    status, headers, body = head_and_body(
        curl("-i", "--data-binary", "job data", server.user + "/later", input=b"")
    )
    answered = time.monotonic() - started
    assert status == "HTTP/1.1 202 Accepted"
    assert headers["location"] == ["/jobs/1"]
    assert body == b""
    assert answered < 2, "the answer waited for the process"
    assert not (state / "later.done").exists()
    wait_for(lambda: (state / "later.done").exists(), 15, "the work after the answer")
    assert (state / "later.done").read_bytes() == b"job data"
    assert (state / "later.err").read_text() == "kapow: Response Already Ended\n"


def test_the_body_on_stdin_of_a_50_mb_upload(served: tuple[KapowServer, Path], tmp_path: Path) -> None:
    server, _ = served
    upload = tmp_path / "upload"
    data = os.urandom(1024 * 1024) * 50
    upload.write_bytes(data)
    result = curl("--data-binary", f"@{upload}", server.user + "/sum")
    assert result.returncode == 0, result.stderr
    assert result.stdout == hashlib.sha256(data).hexdigest() + "\n"


def test_a_handler_that_reads_little_of_its_stdin(served: tuple[KapowServer, Path], tmp_path: Path) -> None:
    server, _ = served
    upload = tmp_path / "upload"
    upload.write_bytes(b"first" + os.urandom(5 * 1024 * 1024))
    for _ in range(3):
        result = curl("--data-binary", f"@{upload}", server.user + "/first", input=b"")
        assert (result.returncode, result.stdout) == (0, b"first"), result.stderr


def test_exit_status_to_http_status_with_the_body_kept(served: tuple[KapowServer, Path]) -> None:
    server, _ = served
    status, headers, body = head_and_body(curl("-i", server.user + "/fail", input=b""))
    assert status == "HTTP/1.1 500 Internal Server Error"
    assert headers["content-length"] == ["10"]
    assert headers["x-step"] == ["3"]
    assert body == b"disk full\n"


def test_a_handler_killed_by_a_signal_gets_the_error_status(served: tuple[KapowServer, Path]) -> None:
    server, _ = served
    assert curl("-o", "/dev/null", "-w", "%{http_code}", server.user + "/killed").stdout == "503"


def test_a_handler_own_error_status_is_kept(served: tuple[KapowServer, Path]) -> None:
    server, _ = served
    assert curl("-o", "/dev/null", "-w", "%{http_code}", server.user + "/own").stdout == "404"


def test_json_errors_show_their_reason_in_the_status_line(served: tuple[KapowServer, Path]) -> None:
    server, state = served
    (state / "wait.id").unlink(missing_ok=True)
    (state / "wait.go").unlink(missing_ok=True)
    user = subprocess.Popen(["curl", "-si", server.user + "/wait"], stdout=subprocess.PIPE)
    try:
        wait_for(
            lambda: (state / "wait.id").exists() and (state / "wait.id").read_text().strip(),
            10,
            "the handler",
        )
        handler = (state / "wait.id").read_text().strip()
        data = server.data + "/handlers/" + handler
        cases = [
            (["-X", "DELETE", data + "/response/headers/X-A"], "HTTP/1.1 200 OK", None),
            ([data + "/request/headers/%ff"], "HTTP/1.1 400 Invalid Resource Path", "Invalid Resource Path"),
            ([data + "/request/params/%zz"], "HTTP/1.1 400 Invalid Resource Path", "Invalid Resource Path"),
            ([data + "/request/nope"], "HTTP/1.1 400 Invalid Resource Path", "Invalid Resource Path"),
            (
                [data + "/request/headers/X-None"],
                "HTTP/1.1 404 Resource Item Not Found",
                "Resource Item Not Found",
            ),
            (
                ["-X", "DELETE", data + "/response/status"],
                "HTTP/1.1 405 Method Not Allowed",
                "Method Not Allowed",
            ),
            (
                ["-X", "PUT", "--data-binary", "x\ny", data + "/response/reason"],
                "HTTP/1.1 400 Invalid Reason Phrase",
                "Invalid Reason Phrase",
            ),
            (
                ["-X", "PUT", "--data-binary", "abc", data + "/response/status"],
                "HTTP/1.1 422 Non Integer Value",
                "Non Integer Value",
            ),
            (
                [server.data + "/handlers/" + "0" * 32 + "/request/method"],
                "HTTP/1.1 404 Handler ID Not Found",
                "Handler ID Not Found",
            ),
        ]
        for args, status_line, reason in cases:
            status, headers, body = head_and_body(curl("-i", *args, input=b""))
            assert status == status_line, args
            if reason is not None:
                assert headers["content-type"] == ["application/json"], args
                assert json.loads(body)["reason"] == reason, args
        (state / "wait.go").touch()
        out, _ = user.communicate(timeout=15)
    finally:
        if user.poll() is None:
            user.kill()
            user.wait()
    status, headers, body = head_and_body(out)
    assert "x-a" not in headers
    assert body == b"waited"
    for args, status_line in (
        ([server.control + "/routes/nope"], "HTTP/1.1 404 Route Not Found"),
        (["-X", "POST", "--data-binary", "{", server.control + "/routes"], "HTTP/1.1 400 Malformed JSON"),
        (
            [
                "-X",
                "POST",
                "--data-binary",
                '{"method": "GET", "url_pattern": "/x", "buffer": 1}',
                server.control + "/routes",
            ],
            "HTTP/1.1 422 Invalid Route",
        ),
        (["-X", "PATCH", server.control + "/routes"], "HTTP/1.1 405 Method Not Allowed"),
    ):
        result = server.curl_control("-i", *args, input=b"")
        status, headers, body = head_and_body(result)
        assert status == status_line, args
        assert json.loads(body)["reason"] == status_line.split(" ", 2)[2], args


def test_route_json_shows_the_options(served: tuple[KapowServer, Path]) -> None:
    server, _ = served
    by_pattern = {route["url_pattern"]: route for route in routes(server)}
    assert by_pattern["/sum"]["stdin"] == "body"
    assert (by_pattern["/fail"]["buffer"], by_pattern["/fail"]["error_status"]) == (True, 500)
    assert not {"stdin", "buffer", "error_status"} & set(by_pattern["/reason"])


def test_the_body_on_stdin_with_debug(start_server: Any) -> None:
    server = start_server(extra=("--debug",))
    server.add_route(
        "/sum", 'sha256sum | cut -d" " -f1 | kapow set /response/body', "-X", "POST", "--stdin", "body"
    )
    for data in (b"small", os.urandom(2 * 1024 * 1024)):
        result = curl("--data-binary", "@-", server.user + "/sum", input=data)
        assert (result.returncode, result.stdout) == (0, hashlib.sha256(data).hexdigest().encode() + b"\n")
