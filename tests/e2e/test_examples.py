"""
The init programs in examples/, each run by a real server and driven with curl
exactly as their comment headers say.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.kapowserver import KapowServer, curl

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    @property
    def text(self) -> str:
        return self.body.decode()


Fetch = Callable[..., Reply]


@pytest.fixture
def fetch(tmp_path: Path) -> Fetch:
    """``fetch(url, *curl_args)``: one request with curl; status, headers and body."""
    counter = iter(range(1_000_000))

    def run(url: str, *args: str) -> Reply:
        body = tmp_path / f"body{next(counter)}"
        result = curl("-D", "-", "-o", str(body), *args, url)
        assert result.returncode == 0, result.stderr
        block = result.stdout.replace("\r\n", "\n").strip("\n").split("\n\n")[-1]
        status_line, *lines = block.split("\n")
        headers = []
        for line in lines:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        return Reply(
            int(status_line.split()[1]),
            headers,
            body.read_bytes() if body.exists() else b"",
        )

    return run


def start_example(start_server: Any, name: str, env: dict[str, str] | None = None) -> KapowServer:
    """A server running examples/<name>, once its init program has finished."""
    program = EXAMPLES / name
    assert os.access(program, os.X_OK), f"{program} must be executable"
    server = start_server(str(program), env=None if env is None else {**os.environ, **env})
    server.wait_log(re.escape(name) + " exited with status 0")
    return server


def test_examples_are_posix_shell_scripts() -> None:
    programs = sorted(EXAMPLES.glob("*.pow"))
    assert {p.name for p in programs} >= {
        "hello.pow",
        "echo.pow",
        "upload.pow",
        "json.pow",
        "stream.pow",
        "status.pow",
        "headers.pow",
        "checksum.pow",
        "later.pow",
        "github-webhook.pow",
    }
    for program in programs:
        assert program.read_text().startswith("#!/bin/sh\n"), program
        check = subprocess.run(["sh", "-n", str(program)], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stderr


TEXT = "text/plain; charset=utf-8"


def test_hello(start_server: Any, fetch: Fetch) -> None:
    server = start_example(start_server, "hello.pow")
    hello = fetch(server.user + "/hello")
    assert (hello.status, hello.text, hello.header("content-type")) == (
        200,
        "Hello, World!\n",
        TEXT,
    )
    greet = fetch(server.user + "/greet/Alice")
    assert (greet.status, greet.text) == (200, "Hello, Alice!\n")
    assert fetch(server.user + "/greet/a/b").status == 404


def test_echo_matches_and_params(start_server: Any, fetch: Fetch) -> None:
    server = start_example(start_server, "echo.pow")
    three = fetch(server.user + "/echo/hello?times=3")
    assert (three.status, three.text, three.header("content-type")) == (
        200,
        "hello\n" * 3,
        TEXT,
    )
    assert three.header("x-echo") == "hello"
    once = fetch(server.user + "/echo/hi")
    assert (once.status, once.text) == (200, "hi\n")
    for bad in ("0", "101", "x", "-1", "1%3Bid", "%0A1", ""):
        refused = fetch(server.user + "/echo/hi?times=" + bad)
        assert (refused.status, refused.text) == (
            400,
            "times must be a whole number from 1 to 100",
        ), bad


HOSTILE_WORDS = [
    ("-n", "-n"),
    ("-h", "-h"),
    ("--data-url=nowhere", "--data-url=nowhere"),
    ("--handler=x", "--handler=x"),
    ("%5Cn%25s%25d", "\\n%s%d"),
    ("%24(id)%60id%60", "$(id)`id`"),
    ("*", "*"),
    ("a%20%20b", "a  b"),
    ("%3Chtml%3E%3Cbody%20onload=alert(1)%3E", "<html><body onload=alert(1)>"),
]


def test_echo_hostile_words_come_back_verbatim(start_server: Any, fetch: Fetch) -> None:
    server = start_example(start_server, "echo.pow")
    for segment, word in HOSTILE_WORDS:
        reply = fetch(server.user + "/echo/" + segment + "?times=2")
        assert (reply.status, reply.text) == (200, f"{word}\n{word}\n"), segment
        assert reply.header("x-echo") == word, segment
        assert reply.header("content-type") == TEXT, segment


def test_echo_find_treats_the_query_as_a_fixed_string(start_server: Any, fetch: Fetch) -> None:
    server = start_example(start_server, "echo.pow")
    found = fetch(server.user + "/find?q=AN")
    assert (found.status, found.text) == (200, "banana\nmango\norange\n")
    everything = fetch(server.user + "/find")
    assert everything.text == "apple\nbanana\ncherry\nlemon\nmango\norange\n"
    for query, shown in (
        ("-v", "-v"),
        (".", "."),
        ("--help", "--help"),
        ("a%2A", "a*"),
    ):
        missing = fetch(server.user + "/find?q=" + query)
        assert (missing.status, missing.text) == (404, f"nothing matches {shown}\n"), query


def test_upload(start_server: Any, fetch: Fetch, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    server = start_example(start_server, "upload.pow", env={"TMPDIR": str(scratch)})
    data = os.urandom(100_000) + b"\0\n\r\n"
    report = tmp_path / "report.bin"
    report.write_bytes(data)
    reply = fetch(server.user + "/upload", "-F", f"file=@{report}")
    expected = f"filename: report.bin\nsize: {len(data)}\nsha256: {hashlib.sha256(data).hexdigest()}\n"
    assert (reply.status, reply.text, reply.header("content-type")) == (
        200,
        expected,
        TEXT,
    )

    # the server passes on only the last part of a client's path; the handler never uses it as one
    hostile = fetch(server.user + "/upload", "-F", f"file=@{report};filename=../../evil$(id).txt")
    assert hostile.status == 200
    assert hostile.text.startswith("filename: evil$(id).txt\nsize: 100004\n")

    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    nothing = fetch(server.user + "/upload", "-F", f"file=@{empty}")
    assert nothing.text == f"filename: empty\nsize: 0\nsha256: {hashlib.sha256(b'').hexdigest()}\n"

    wrong = fetch(server.user + "/upload", "-F", f"other=@{report}")
    assert wrong.status == 400
    assert wrong.text == 'send the file as a form field named "file": curl -F file=@PATH'
    assert fetch(server.user + "/upload").status == 405

    # every handler removed its work directory (the server keeps its own kapow-* there)
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("kapow-")] == []
    assert not list(tmp_path.glob("**/evil*"))


requires_jq = pytest.mark.skipif(
    shutil.which("jq") is None, reason="jq is not installed (apt-get install jq)"
)


@requires_jq
def test_json(start_server: Any, fetch: Fetch) -> None:
    server = start_example(start_server, "json.pow")
    url = server.user + "/greet"
    ok = fetch(
        url,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        '{"name": "Alice", "age": 7}',
    )
    assert (ok.status, ok.text, ok.header("content-type")) == (
        200,
        '{"greeting":"Hello, Alice!"}\n',
        "application/json",
    )
    tricky = fetch(url, "--data-binary", '{"name": "\\"quoted\\"\\n<b>"}')
    assert tricky.text == '{"greeting":"Hello, \\"quoted\\"\\n<b>!"}\n'

    not_object = '{"error":"the body must be one JSON object"}\n'
    not_name = '{"error":"field \\"name\\" must be a non-empty string"}\n'
    for body, expected in (
        ("nope", not_object),
        ("", not_object),
        ("[1, 2]", not_object),
        ('{"name": "a"} {"name": "b"}', not_object),
        ("{}", not_name),
        ('{"name": 5}', not_name),
        ('{"name": ""}', not_name),
    ):
        reply = fetch(url, "--data-binary", body)
        assert (reply.status, reply.text, reply.header("content-type")) == (
            400,
            expected,
            "application/json",
        ), body
    assert fetch(url).status == 405


def test_stream_ticks_arrive_one_by_one(start_server: Any) -> None:
    server = start_example(start_server, "stream.pow")
    request = subprocess.Popen(
        ["curl", "-sS", "-N", "--max-time", "10", server.user + "/ticks?n=3"],
        stdout=subprocess.PIPE,
    )
    assert request.stdout is not None
    first = request.stdout.readline()
    first_at = time.monotonic()
    rest = request.stdout.read()
    assert request.wait(10) == 0
    ended_at = time.monotonic()
    assert first + rest == b"tick 1\ntick 2\ntick 3\n"
    # two 0.3 s pauses come after the first line: it was not held back
    assert ended_at - first_at > 0.3


def test_stream_tail_follows_a_file_and_ends_by_itself(start_server: Any, tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("old 1\nold 2\nold 3\n")
    server = start_example(start_server, "stream.pow", env={"TAIL_FILE": str(log)})
    started = time.monotonic()
    request = subprocess.Popen(
        ["curl", "-sS", "-N", "-D", str(tmp_path / "head"), "--max-time", "15",
         server.user + "/tail?lines=2&seconds=2"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert request.stdout is not None
    assert request.stdout.readline() == b"old 2\n"
    assert request.stdout.readline() == b"old 3\n"
    for n in (1, 2):
        with log.open("a") as f:
            f.write(f"new {n}\n")
        assert request.stdout.readline() == f"new {n}\n".encode()
    assert request.stdout.read() == b""
    assert request.wait(10) == 0
    assert 1.5 < time.monotonic() - started < 8
    head = (tmp_path / "head").read_text().lower()
    assert head.startswith("http/1.1 200") and "content-type: text/plain; charset=utf-8" in head


def test_stream_tail_without_a_file(start_server: Any, fetch: Fetch, tmp_path: Path) -> None:
    server = start_example(start_server, "stream.pow", env={"TAIL_FILE": str(tmp_path / "absent.log")})
    reply = fetch(server.user + "/tail")
    assert (reply.status, reply.text) == (
        404,
        "no log file to follow (set TAIL_FILE for the server)",
    )


def test_status_codes_and_redirects(start_server: Any, fetch: Fetch, tmp_path: Path) -> None:
    items = tmp_path / "items"
    items.mkdir()
    server = start_example(start_server, "status.pow", env={"ITEMS_DIR": str(items)})
    base = server.user

    created = fetch(base + "/items", "--data-binary", "buy milk")
    assert created.status == 201
    location = created.header("location")
    assert location is not None and location.startswith("/items/")
    item_id = location.removeprefix("/items/")
    assert created.text == item_id + "\n"
    assert (items / item_id).read_text() == "buy milk"

    got = fetch(base + location)
    assert (got.status, got.text, got.header("content-type")) == (200, "buy milk", TEXT)
    listed = fetch(base + "/items")
    assert (listed.status, listed.text) == (200, item_id + "\n")

    redirect = fetch(base + "/")
    assert (redirect.status, redirect.header("location"), redirect.body) == (
        302,
        "/items",
        b"",
    )
    followed = fetch(base + "/", "-L")
    assert (followed.status, followed.text) == (200, item_id + "\n")

    empty = fetch(base + "/items", "-X", "POST")
    assert (empty.status, empty.text) == (
        400,
        "an item needs some text in the request body",
    )
    assert sorted(p.name for p in items.iterdir()) == [item_id]

    for missing in ("nope", "..", "a.b", "%2e%2e%2fetc"):
        reply = fetch(base + "/items/" + missing, "--path-as-is")
        assert reply.status == 404, missing
    assert fetch(base + "/items/nope").text == "no item nope\n"

    deleted = fetch(base + location, "-X", "DELETE")
    assert (deleted.status, deleted.body) == (204, b"")
    assert fetch(base + location).status == 404
    again = fetch(base + location, "-X", "DELETE")
    assert (again.status, again.text) == (404, f"no item {item_id}\n")
    assert list(items.iterdir()) == []


def test_status_makes_its_own_store(start_server: Any, fetch: Fetch, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ITEMS_DIR"}
    env["TMPDIR"] = str(tmp_path)
    server = start_server(str(EXAMPLES / "status.pow"), env=env)
    server.wait_log(r"status\.pow exited with status 0")
    created = fetch(server.user + "/items", "--data-binary", "x")
    assert created.status == 201
    location = created.header("location")
    assert location is not None
    assert fetch(server.user + location).text == "x"
    assert fetch(server.user + location, "-X", "DELETE").status == 204
    (store,) = [p for p in tmp_path.glob("tmp.*") if p.is_dir()]
    assert list(store.iterdir()) == []


def test_headers_every_value_as_json(start_server: Any, fetch: Fetch) -> None:
    server = start_example(start_server, "headers.pow")
    both = fetch(server.user + "/headers?q=1&q=2&e", "-H", "X-Tag: a", "-H", "X-Tag: b")
    assert both.status == 200
    assert both.header("content-type") == "application/json"
    data = json.loads(both.body)
    assert data["params"] == {"q": ["1", "2"], "e": [""]}
    assert data["headers"]["x-tag"] == ["a", "b"]
    assert data["headers"]["host"] == [server.user.removeprefix("http://")]
    one = fetch(server.user + "/headers/X-TAG", "-H", "X-Tag: a", "-H", "X-Tag: b")
    assert json.loads(one.body) == ["a", "b"]
    assert json.loads(fetch(server.user + "/headers/x-none").body) == []


def test_checksum_reads_the_body_on_stdin(start_server: Any, fetch: Fetch, tmp_path: Path) -> None:
    server = start_example(start_server, "checksum.pow")
    upload = tmp_path / "upload"
    data = os.urandom(3 * 1024 * 1024)
    upload.write_bytes(data)
    digest = fetch(server.user + "/sha256", "--data-binary", f"@{upload}")
    assert (digest.status, digest.text) == (200, hashlib.sha256(data).hexdigest() + "\n")
    count = fetch(server.user + "/count", "--data-binary", "hello")
    assert (count.status, count.text) == (200, "5\n")
    empty = fetch(server.user + "/count", "-X", "POST")
    assert (empty.status, empty.text) == (200, "0\n")


def test_later_answers_202_and_works_on(start_server: Any, fetch: Fetch, tmp_path: Path) -> None:
    server = start_example(start_server, "later.pow", env={"JOBS_DIR": str(tmp_path)})
    started = time.monotonic()
    accepted = fetch(server.user + "/jobs", "--data-binary", "some work")
    assert time.monotonic() - started < 2, "the answer waited for the work"
    assert (accepted.status, accepted.body) == (202, b"")
    location = accepted.header("location")
    assert location is not None and re.fullmatch(r"/jobs/[A-Za-z0-9]+", location), location
    running = fetch(server.user + location)
    assert running.status == 404
    assert "is not done" in running.text
    deadline = time.monotonic() + 15
    while (done := fetch(server.user + location)).status == 404:
        assert time.monotonic() < deadline, "the job never finished"
        time.sleep(0.1)
    assert (done.status, done.text) == (200, "SOME WORK")


def test_deploy_runs_one_at_a_time_in_arrival_order(start_server: Any, fetch: Fetch, tmp_path: Path) -> None:
    deploys = tmp_path / "deploys"
    deploys.mkdir()
    server = start_example(
        start_server, "deploy.pow", env={"DEPLOY_DIR": str(deploys), "DEPLOY_SECONDS": "0.3"}
    )
    refs = ["v1.2", "v1.3", "hotfix-7"]
    pushes = []
    for n, ref in enumerate(refs):
        pushes.append(
            subprocess.Popen(
                ["curl", "-sS", "-X", "POST", "-w", "\n%{http_code}", f"{server.user}/deploy/{ref}"],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
        # the next push once this one is in: running, or queued behind the others
        deadline = time.monotonic() + 10
        while len(json.loads(server.kapow("handler", "list").stdout)) + done(deploys) < n + 1:
            assert time.monotonic() < deadline, "the push did not arrive"
            time.sleep(0.02)
    answers = [push.communicate(timeout=30)[0] for push in pushes]
    assert answers == [f"deployed {ref}\n\n200" for ref in refs]
    log = (deploys / "log").read_text().split("\n")
    assert log == [f"{what} {ref}" for ref in refs for what in ("start", "done")] + [""]
    listed = fetch(server.user + "/deploys")
    assert (listed.status, listed.text) == (200, "".join(f"{ref}\n" for ref in refs))
    assert fetch(server.user + "/deploy/v1;id", "-X", "POST").status == 404
    route = next(r for r in json.loads(server.kapow("route", "list").stdout) if r["method"] == "POST")
    assert (route["max_concurrency"], route["queue"], route["limits"]["memory"]) == (1, 10, 1 << 30)


def done(deploys: Path) -> int:
    log = deploys / "log"
    return log.read_text().count("done ") if log.exists() else 0


def test_github_webhook_serves_only_signed_deliveries(
    start_server: Any, fetch: Fetch, tmp_path: Path
) -> None:
    import hmac

    secret = tmp_path / "github.secret"
    secret.write_text("the webhook secret")
    server = start_example(start_server, "github-webhook.pow", env={"GITHUB_SECRET_FILE": str(secret)})
    body = '{"zen":"Keep it logically awesome."}'
    signature = "sha256=" + hmac.new(b"the webhook secret", body.encode(), hashlib.sha256).hexdigest()

    def deliver(event: str, *headers: str, data: str = body) -> Reply:
        return fetch(
            server.user + "/github", "-H", f"X-GitHub-Event: {event}", "-H", "X-GitHub-Delivery: d-1",
            *headers, "--data-binary", data,
        )  # fmt: skip

    pong = deliver("ping", "-H", f"X-Hub-Signature-256: {signature}")
    assert (pong.status, pong.text) == (200, "pong\n")
    push = deliver("push", "-H", f"X-Hub-Signature-256: {signature}")
    assert (push.status, push.text) == (200, "accepted push d-1\n")
    server.wait_log(r"github: delivery d-1: push event, 36 bytes")
    assert deliver("push").status == 401
    assert deliver("push", "-H", f"X-Hub-Signature-256: {signature}", data=body + " ").status == 401


def test_cors_api_preflights_and_rates(start_server: Any, fetch: Fetch, tmp_path: Path) -> None:
    server = start_example(start_server, "cors-api.pow", env={"LIKES_DIR": str(tmp_path)})
    url = server.user + "/api/likes"
    liked = fetch(url, "-X", "POST", "-H", "X-Requested-With: curl")
    assert (liked.status, liked.text, liked.header("content-type")) == (
        200,
        '{"likes":1}\n',
        "application/json",
    )
    assert liked.header("access-control-allow-origin") is None  # no Origin, no CORS headers

    asking = ("-X", "OPTIONS", "-H", "Access-Control-Request-Method: POST",
              "-H", "Access-Control-Request-Headers: x-requested-with")  # fmt: skip
    preflight = fetch(url, *asking, "-H", "Origin: http://localhost:8000")
    assert (preflight.status, preflight.body) == (204, b"")
    assert preflight.header("access-control-allow-origin") == "http://localhost:8000"
    assert preflight.header("access-control-allow-methods") == "POST"
    assert preflight.header("access-control-allow-headers") == "X-Requested-With"
    assert preflight.header("vary") == "Origin"
    foreign = fetch(url, *asking, "-H", "Origin: https://elsewhere.example")
    assert foreign.status == 403 and foreign.header("access-control-allow-origin") is None

    # sent without a preflight, as a form on any site could: refused, not counted
    simple = fetch(url, "-X", "POST", "-H", "Origin: https://elsewhere.example")
    assert (simple.status, simple.text) == (400, '{"error":"send an X-Requested-With header"}')
    assert (tmp_path / "likes").read_text() == "x"

    # --burst 10: the like and the refusal above took two tokens; then one a second
    likes = ("-X", "POST", "-H", "X-Requested-With: curl", "-H", "Origin: http://localhost:8000")
    replies = [fetch(url, *likes)]
    while replies[-1].status == 200:
        assert len(replies) < 30, "never refused"
        replies.append(fetch(url, *likes))
    assert len(replies) >= 9 and all(reply.status == 200 for reply in replies[:8])
    over = replies[-1]
    assert (over.status, over.text, over.header("retry-after")) == (429, "Too Many Requests\n", "1")
    assert over.header("access-control-allow-origin") == "http://localhost:8000"
    assert len((tmp_path / "likes").read_text()) == len(replies)  # the first like, and not the 429

    page = fetch(server.user + "/likes")
    assert (page.status, page.header("content-type")) == (200, "text/html; charset=utf-8")
    assert page.body == (EXAMPLES / "cors-api.html").read_bytes()
