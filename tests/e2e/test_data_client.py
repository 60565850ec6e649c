"""Tests for ``kapow get``/``set``/``unset`` (both clients) and kapow.commands.launcher.

Everything runs for real: a small threaded HTTP/1.1 data server on 127.0.0.1
(or a unix socket) records what it receives, and the ``kapow`` written by
``write_launcher`` runs as a subprocess with KAPOW_DATA_URL/KAPOW_HANDLER_ID.
Every command-line case runs twice: with the Python lean client
(kapow.commands.data_client) and with the native one (src/kapow/native/kapow.c).
"""

import errno
import http.server
import io
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

import kapow
from kapow.commands.data_client import DataAPIError, DataClient, _json_string, is_lean_command
from kapow.commands.launcher import FULL_CLI, MAX_SHEBANG, launcher_source, write_launcher
from tests.support.kapowserver import bare_environ, curl, free_port
from tests.support.native import native_client_or_skip

SRC = os.path.dirname(os.path.dirname(os.path.abspath(kapow.__file__)))
HANDLER = "a1b2c3"
TIMEOUT = 30


# A fake data server


@dataclass
class Record:
    conn: int
    method: str
    path: str
    headers: dict
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: tuple = ()
    chunked: bool = False  # Transfer-Encoding: chunked, in pieces of chunk_size
    chunk_size: int = 1000
    close: bool = False  # send "Connection: close" and close afterwards
    drop: bool = False  # close afterwards without saying so
    no_length: bool = False  # neither Content-Length nor chunked: body ends at close
    reason: str = ""


def json_error(status, reason, detail=None):
    fields = {"reason": reason} if detail is None else {"reason": reason, "detail": detail}
    body = json.dumps(fields).encode()
    return Reply(status, body, (("Content-Type", "application/json"),))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.conn_id = self.server.fake.new_connection()

    def log_message(self, format, *args):
        pass

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        record = Record(self.conn_id, self.command, self.path, headers, body)
        fake = self.server.fake
        with fake.lock:
            fake.requests.append(record)
        reply = fake.respond(record)
        self._send(reply)

    do_GET = do_PUT = do_POST = do_DELETE = _handle

    def _send(self, reply):
        reason = reply.reason or self.responses.get(reply.status, ("X",))[0]
        head = ["HTTP/1.1 %d %s" % (reply.status, reason)]
        head += ["%s: %s" % h for h in reply.headers]
        if reply.chunked:
            head.append("Transfer-Encoding: chunked")
        elif not reply.no_length:
            head.append("Content-Length: %d" % len(reply.body))
        if reply.close or reply.no_length:
            head.append("Connection: close")
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if reply.chunked:
            body = reply.body
            for i in range(0, len(body), reply.chunk_size):
                piece = body[i : i + reply.chunk_size]
                self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
        else:
            self.wfile.write(reply.body)
        if reply.close or reply.drop or reply.no_length:
            self.close_connection = True


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


class FakeDataServer:
    """Records requests; GETs answer from ``values``, PUTs with 200."""

    def __init__(self, unix_path=None):
        self.lock = threading.Lock()
        self.requests = []
        self.values = {}
        self.responder = None
        self._ids = itertools.count()
        if unix_path:
            self.server = _UnixServer(unix_path, _Handler)
            self.url = "http+unix://" + unix_path.replace("/", "%2F")
        else:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            self.server.daemon_threads = True
            self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.server.fake = self
        self.connections = 0
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def new_connection(self):
        with self.lock:
            self.connections += 1
            return next(self._ids)

    def respond(self, record):
        if self.responder is not None:
            reply = self.responder(record)
            if reply is not None:
                return reply
        if record.method == "GET":
            resource = record.path.split(HANDLER, 1)[-1]
            if resource in self.values:
                return Reply(body=self.values[resource])
            return json_error(404, "Resource Item Not Found")
        return Reply()

    def puts(self):
        with self.lock:
            return [r for r in self.requests if r.method == "PUT"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    fake = FakeDataServer()
    yield fake
    fake.close()


@pytest.fixture(scope="module", params=["python", "native"])
def launcher(request, tmp_path_factory):
    """``kapow`` as handlers get it: the Python launcher, or the native client."""
    native = native_client_or_skip() if request.param == "native" else None
    return write_launcher(str(tmp_path_factory.mktemp("bin")), native=native)


def kapow_env(url, handler=HANDLER):
    env = bare_environ(KAPOW_DATA_URL=url)
    if handler is not None:
        env["KAPOW_HANDLER_ID"] = handler
    return env


def run(launcher, *args, url, input=b"", handler=HANDLER, env=None):
    return subprocess.run(
        [launcher, *args],
        input=input,
        capture_output=True,
        env=env or kapow_env(url, handler),
        timeout=TIMEOUT,
    )


def start_set_body(launcher, server):
    return subprocess.Popen(
        [launcher, "set", "/response/body"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=kapow_env(server.url),
    )


def one_error_line(result):
    """The one line on stderr of a failure: ``kapow: ...`` for what the data API said
    or why it could not be reached, ``kapow COMMAND: ...`` for the rest."""
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match(r"kapow( get| set| unset)?: ", lines[0]), lines[0]
    return lines[0]


# kapow get


def test_get_value(server, launcher):
    server.values["/request/method"] = b"POST"
    result = run(launcher, "get", "/request/method", url=server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"POST"
    assert result.stderr == b""
    (req,) = server.requests
    assert req.method == "GET"
    assert req.path == "/handlers/%s/request/method" % HANDLER
    assert req.headers["host"] == server.url.split("//")[1]


def test_get_streams_megabytes_of_binary(server, launcher):
    value = os.urandom(3 * 1024 * 1024 + 17)
    server.values["/request/body"] = value
    result = run(launcher, "get", "/request/body", url=server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == value


@pytest.mark.parametrize("chunk_size", [1, 7, 70000])
def test_get_chunked(server, launcher, chunk_size):
    value = os.urandom(200_000 if chunk_size > 1 else 3000)
    server.responder = lambda r: Reply(body=value, chunked=True, chunk_size=chunk_size)
    result = run(launcher, "get", "/request/files/f/content", url=server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == value


def test_get_until_close(server, launcher):
    value = os.urandom(500_000)
    server.responder = lambda r: Reply(body=value, no_length=True)
    result = run(launcher, "get", "/request/body", url=server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == value


def test_get_empty_value(server, launcher):
    server.values["/request/body"] = b""
    result = run(launcher, "get", "/request/body", url=server.url)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_get_not_found_prints_reason(server, launcher):
    result = run(launcher, "get", "/request/params/nope", url=server.url)
    assert one_error_line(result) == "kapow: Resource Item Not Found"


def test_get_refusal_with_chunked_error_body(server, launcher):
    def respond(record):
        reply = json_error(405, "Method Not Allowed Here")
        reply.chunked, reply.chunk_size = True, 5
        return reply

    server.responder = respond
    result = run(launcher, "get", "/response/body", url=server.url)
    assert one_error_line(result) == "kapow: Method Not Allowed Here"


def test_get_reason_with_escapes(server, launcher):
    reason = 'bad "x" \\ caf\u00e9 \U0001f600 a/b\nnext'
    server.responder = lambda r: json_error(400, reason)
    result = run(launcher, "get", "/request/x", url=server.url)
    line = one_error_line(result)
    assert line == 'kapow: bad "x" \\ caf\u00e9 \U0001f600 a/b next'


def test_set_refusal_prints_reason_and_detail(server, launcher):
    server.responder = lambda r: json_error(422, "Non Integer Value", "status 'abc' is not an integer")
    result = run(launcher, "set", "/response/status", "abc", url=server.url)
    assert one_error_line(result) == "kapow: Non Integer Value: status 'abc' is not an integer"


@pytest.mark.parametrize(
    ("body", "line"),
    [
        # before the reason too; the reason and the detail are each made one line
        (b'{"detail": "x\\n  y", "reason": "a  b"}', "kapow: a  b: x y"),
        (b'{"reason": "a\\nb", "detail": "caf\\u00e9 \\"q\\" \\\\"}', 'kapow: a b: caf\u00e9 "q" \\'),
        (b'{"reason": "R", "detail": ""}', "kapow: R"),
        (b'{"reason": "R", "detail": 12}', "kapow: R"),
        (b'{"reason": "R", "detail": "unterminated}', "kapow: R"),
        # no reason: the status line's, without the detail
        (b'{"reason": "", "detail": "d"}', "kapow: Unprocessable Entity"),
        (b'{"detail": "d"}', "kapow: Unprocessable Entity"),
    ],
)
def test_unset_refusal_detail_forms(server, launcher, body, line):
    server.responder = lambda r: Reply(422, body, (("Content-Type", "application/json"),))
    result = run(launcher, "unset", "/response/headers/X-A", url=server.url)
    assert one_error_line(result) == line


def test_refusals_of_a_real_data_api(start_server, launcher):
    """In a handler, a refusal with a detail and one without, as the server words them."""
    server = start_server()
    kapow = shlex.quote(launcher)
    tries = f"{kapow} set /response/status abc; echo $?; {kapow} get /request/params/nope; echo $?"
    server.add_route("/try", f"{{ {tries}; }} 2>&1 | {kapow} set /response/body")
    done = curl(server.user + "/try")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        "kapow: Non Integer Value: status 'abc' is not an integer\n1\nkapow: Resource Item Not Found\n1\n"
    )


def test_get_non_json_error_uses_status_reason(server, launcher):
    server.responder = lambda r: Reply(502, b"<html>oops</html>")
    result = run(launcher, "get", "/request/method", url=server.url)
    assert one_error_line(result) == "kapow: Bad Gateway"


def test_get_connection_refused(launcher):
    url = "http://127.0.0.1:%d" % free_port()
    result = run(launcher, "get", "/request/method", url=url)
    line = one_error_line(result)
    assert line == "kapow: cannot reach data API at %s: Connection refused" % url


@pytest.mark.parametrize(
    "make, code",
    [
        (lambda path: os.symlink(path, path), errno.ELOOP),  # texts musl words otherwise
        (lambda path: None, errno.ENOENT),
    ],
    ids=["symlink-loop", "missing"],
)
def test_get_socket_error_texts(tmp_path, launcher, make, code):
    """A system error reads as the C library's text, as Python's own."""
    path = str(tmp_path / "data.sock")
    make(path)
    url = "http+unix://" + path.replace("/", "%2F")
    line = one_error_line(run(launcher, "get", "/request/method", url=url))
    assert line == "kapow: cannot reach data API at %s: %s" % (url, os.strerror(code))


def test_get_by_host_name(server, launcher):
    server.values["/request/method"] = b"GET"
    url = server.url.replace("127.0.0.1", "localhost")
    result = run(launcher, "get", "/request/method", url=url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"GET"
    assert server.requests[0].headers["host"] == url.split("//")[1]


def test_get_with_url_prefix(server, launcher):
    server.values["/request/method"] = b"GET"
    result = run(launcher, "get", "/request/method", url=server.url + "/api/v1/")
    assert result.returncode == 0, result.stderr
    assert server.requests[0].path == "/api/v1/handlers/%s/request/method" % HANDLER


def test_get_resource_sent_as_given(server, launcher):
    server.values["/request/params/a%20b"] = b"1"
    result = run(launcher, "get", "/request/params/a%20b", url=server.url)
    assert result.stdout == b"1"
    result = run(launcher, "get", "/request/params/\u00f1?#", url=server.url)
    assert server.requests[-1].path.endswith("/request/params/%C3%B1%3F%23")


@pytest.mark.parametrize("resource", ["request/method", "/request/a b", "/x\ty", "/x\x7f", ""])
def test_bad_resource_refused(server, launcher, resource):
    result = run(launcher, "get", resource, url=server.url)
    line = one_error_line(result)
    assert line.startswith("kapow get: invalid resource ")
    result = run(launcher, "set", resource, "v", url=server.url)
    one_error_line(result)
    assert server.requests == []


def test_missing_handler_id(server, launcher):
    result = run(launcher, "get", "/request/method", url=server.url, handler=None)
    line = one_error_line(result)
    assert line == "kapow get: no handler id: set KAPOW_HANDLER_ID or pass --handler"
    assert server.requests == []


def test_flags_override_env(server, launcher):
    server.values["/request/method"] = b"PUT"
    env = kapow_env("http://127.0.0.1:%d" % free_port(), handler="wrong")
    args = ["--data-url", server.url, "--handler=" + HANDLER, "/request/method"]
    result = run(launcher, "get", *args, url=None, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"PUT"
    args = ["--handler", "other", "--data-url=" + server.url, "/response/status", "201"]
    result = run(launcher, "set", *args, url=None, env=env)
    assert result.returncode == 0, result.stderr
    assert server.requests[-1].path == "/handlers/other/response/status"
    assert server.requests[-1].body == b"201"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["get"], "kapow get: missing RESOURCE"),
        (["get", "--handler", "h"], "kapow get: missing RESOURCE"),
        (["get", "/a", "/b"], 'kapow get: unexpected argument "/b"'),
        (["set"], "kapow set: missing RESOURCE"),
        (["set", "/a", "b", "c"], 'kapow set: unexpected argument "c"'),
        (["set", "/a", "--handler", "h"], 'kapow set: unexpected argument "h"'),
        (["get", "--bogus", "/a"], 'kapow get: unknown option "--bogus"'),
        (["get", "/a", "--bogus"], 'kapow get: unknown option "--bogus"'),
        (["get", "/a", "--handler"], "kapow get: option --handler needs a value"),
        (["set", "/a", "b", "--data-url"], "kapow set: option --data-url needs a value"),
        (["unset"], "kapow unset: missing RESOURCE"),
        (["unset", "/a", "b"], 'kapow unset: unexpected argument "b"'),
        (["unset", "--bogus", "/a"], 'kapow unset: unknown option "--bogus"'),
        (["unset", "/a", "--", "--bogus"], 'kapow unset: unexpected argument "--bogus"'),
    ],
)
def test_usage_errors(server, launcher, args, message):
    result = run(launcher, *args, url=server.url)
    assert one_error_line(result) == f"{message} (see kapow {args[0]} --help)"
    assert server.requests == []


@pytest.mark.parametrize(
    "args",
    [
        ["/request/method", "--handler", HANDLER, "--data-url", "{url}"],
        ["--handler=" + HANDLER, "/request/method", "--data-url={url}"],
        ["--data-url", "{url}", "/request/method", "--handler", HANDLER],
    ],
)
def test_get_takes_options_after_the_resource(launcher, server, args):
    server.values["/request/method"] = b"PATCH"
    env = kapow_env("http://127.0.0.1:%d" % free_port(), handler="wrong")
    args = [arg.replace("{url}", server.url) for arg in args]
    result = run(launcher, "get", *args, url=None, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"PATCH", b"")
    assert [r.path for r in server.requests] == ["/handlers/%s/request/method" % HANDLER]


def test_set_and_unset_take_options_after_their_arguments(launcher, server):
    env = kapow_env("http://127.0.0.1:%d" % free_port(), handler="wrong")
    for args, status in (
        (["set", "/response/status", "201", "--handler", "h1", "--data-url", server.url], 0),
        (
            ["set", "/response/body", "--", "--handler=h2", "--data-url=" + server.url],
            1,
        ),  # after --: a 3rd argument
        (["unset", "/response/headers/X-A", "--handler=h3", "--data-url", server.url], 0),
    ):
        result = run(launcher, *args, env=env, url=None)
        assert result.returncode == status, result.stderr
    assert [(r.method, r.path, r.body) for r in server.requests] == [
        ("PUT", "/handlers/h1/response/status", b"201"),
        ("DELETE", "/handlers/h3/response/headers/X-A", b""),
    ]


def test_the_value_of_set_is_never_an_option(launcher, server):
    for value in ("--handler=other", "--help", "-h", "--bogus"):
        result = run(launcher, "set", "/response/body", value, url=server.url)
        assert (result.returncode, result.stderr) == (0, b"")
    result = run(launcher, "set", "/response/body", "--", "--data-url=x", url=server.url)
    assert (result.returncode, result.stderr) == (0, b"")
    assert [(r.path, r.body) for r in server.puts()] == [
        ("/handlers/%s/response/body" % HANDLER, value)
        for value in (b"--handler=other", b"--help", b"-h", b"--bogus", b"--data-url=x")
    ]


def test_help(launcher):
    for command in ("get", "set", "unset"):
        result = run(launcher, command, "--help", url="http://127.0.0.1:1")
        assert result.returncode == 0
        assert b"usage: kapow get" in result.stdout
        assert b"kapow unset [--data-url URL] [--handler ID] RESOURCE" in result.stdout
        assert b"example" in result.stdout
        assert run(launcher, command, "-h", url="x").stdout == result.stdout
        assert b"Options may come before or after the arguments" in result.stdout
    for command in ("get", "unset"):
        late = run(launcher, command, "/request/body", "--help", url="x")
        assert (late.returncode, late.stdout) == (0, result.stdout)


def test_unix_socket(tmp_path, launcher):
    fake = FakeDataServer(unix_path=str(tmp_path / "data.sock"))
    try:
        fake.values["/request/method"] = b"DELETE"
        result = run(launcher, "get", "/request/method", url=fake.url)
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"DELETE"
        data = os.urandom(200_000)
        result = run(launcher, "set", "/response/body", url=fake.url, input=data)
        assert result.returncode == 0, result.stderr
        assert b"".join(r.body for r in fake.puts()) == data
        assert len({r.conn for r in fake.puts()}) == 1
    finally:
        fake.close()


# kapow set


def test_set_value(server, launcher):
    value = "caf\u00e9 1"
    result = run(launcher, "set", "/response/headers/X-Thing", value, url=server.url)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    (req,) = server.requests
    assert req.method == "PUT"
    assert req.path == "/handlers/%s/response/headers/X-Thing" % HANDLER
    assert req.body == "caf\u00e9 1".encode()
    assert req.headers["content-length"] == str(len(req.body))


def test_set_value_to_body_is_one_put(server, launcher):
    result = run(launcher, "set", "/response/body", "-not-an-option", url=server.url)
    assert result.returncode == 0, result.stderr
    assert [r.body for r in server.puts()] == [b"-not-an-option"]


def test_set_stdin_to_status_is_one_put(server, launcher):
    result = run(launcher, "set", "/response/status", url=server.url, input=b"418\n")
    assert result.returncode == 0, result.stderr
    (req,) = server.requests
    assert (req.method, req.body) == ("PUT", b"418\n")


def test_set_large_stdin_to_header_is_one_put(server, launcher):
    data = b"v" * 300_000
    result = run(launcher, "set", "/response/headers/X-Big", url=server.url, input=data)
    assert result.returncode == 0, result.stderr
    assert [r.body for r in server.puts()] == [data]


def test_set_empty_stdin_to_body_sends_one_empty_put(server, launcher):
    result = run(launcher, "set", "/response/body", url=server.url, input=b"")
    assert result.returncode == 0, result.stderr
    assert [r.body for r in server.puts()] == [b""]


@pytest.mark.parametrize("resource", ["/response/body", "/response/stream"])
def test_set_stdin_to_body_streams_over_one_connection(server, launcher, resource):
    data = os.urandom(1_000_000)
    result = run(launcher, "set", resource, url=server.url, input=data)
    assert result.returncode == 0, result.stderr
    puts = server.puts()
    assert len(puts) > 1
    assert all(0 < len(r.body) <= 65536 for r in puts)
    assert {r.path for r in puts} == {"/handlers/%s%s" % (HANDLER, resource)}
    assert b"".join(r.body for r in puts) == data
    assert len({r.conn for r in puts}) == 1
    assert server.connections == 1


def test_set_body_streams_as_stdin_arrives(server, launcher):
    proc = start_set_body(launcher, server)
    try:
        for n, piece in enumerate([b"first\n", b"second\n", b"third\n"], 1):
            proc.stdin.write(piece)
            proc.stdin.flush()
            deadline = time.monotonic() + TIMEOUT
            while len(server.puts()) < n:  # seen by the server before stdin ends
                assert time.monotonic() < deadline, "chunk not sent while stdin open"
                time.sleep(0.01)
            assert server.puts()[-1].body == piece
        proc.stdin.close()
        assert proc.wait(TIMEOUT) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert len({r.conn for r in server.puts()}) == 1


def test_set_body_reconnects_on_connection_close(server, launcher):
    server.responder = lambda r: Reply(close=True)
    data = os.urandom(400_000)
    result = run(launcher, "set", "/response/body", url=server.url, input=data)
    assert result.returncode == 0, result.stderr
    puts = server.puts()
    assert len(puts) > 1
    assert b"".join(r.body for r in puts) == data
    assert len({r.conn for r in puts}) == len(puts)


def test_set_body_reconnects_when_idle_connection_dropped(server, launcher):
    server.responder = lambda r: Reply(drop=True)
    proc = start_set_body(launcher, server)
    try:
        for n, piece in enumerate([b"one ", b"two ", b"three"], 1):
            proc.stdin.write(piece)
            proc.stdin.flush()
            deadline = time.monotonic() + TIMEOUT
            while len(server.puts()) < n:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.05)  # let the server's close reach the client
        proc.stdin.close()
        assert proc.wait(TIMEOUT) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    puts = server.puts()
    assert b"".join(r.body for r in puts) == b"one two three"
    assert len({r.conn for r in puts}) == 3


def test_set_body_server_error_mid_stream(server, launcher):
    def respond(record):
        if len(server.puts()) >= 3:
            return json_error(400, "Response Already Finished")
        return None

    server.responder = respond
    data = os.urandom(2_000_000)
    result = run(launcher, "set", "/response/body", url=server.url, input=data)
    assert one_error_line(result) == "kapow: Response Already Finished"
    assert len(server.puts()) == 3


def test_set_refused(server, launcher):
    server.responder = lambda r: json_error(422, "Non Integer Value")
    result = run(launcher, "set", "/response/status", "abc", url=server.url)
    assert one_error_line(result) == "kapow: Non Integer Value"


def test_set_connection_refused(launcher):
    url = "http://127.0.0.1:%d" % free_port()
    result = run(launcher, "set", "/response/body", url=url, input=b"x" * 10)
    assert "cannot reach data API at %s" % url in one_error_line(result)


# kapow unset


def test_unset_sends_one_delete(server, launcher):
    server.responder = lambda r: Reply(body=b"ignored") if r.method == "DELETE" else None
    result = run(launcher, "unset", "/response/headers/X-Debug", url=server.url, input=b"not read")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    (req,) = server.requests
    assert (req.method, req.path, req.body) == (
        "DELETE",
        "/handlers/%s/response/headers/X-Debug" % HANDLER,
        b"",
    )
    assert req.headers["connection"] == "close"


@pytest.mark.parametrize(
    "reply, message",
    [
        (json_error(409, "Response Already Started"), "kapow: Response Already Started"),
        (json_error(405, "Method Not Allowed"), "kapow: Method Not Allowed"),
        (Reply(500, b"oops", reason="Broken Here"), "kapow: Broken Here"),
    ],
)
def test_unset_refused(server, launcher, reply, message):
    server.responder = lambda r: reply
    result = run(launcher, "unset", "/response/cookies/session", url=server.url)
    assert one_error_line(result) == message


def test_unset_connection_refused(launcher):
    url = "http://127.0.0.1:%d" % free_port()
    result = run(launcher, "unset", "/response/headers/X", url=url)
    assert "cannot reach data API at %s" % url in one_error_line(result)


# The Python API


def test_api_get_set(server):
    client = DataClient(server.url, HANDLER)
    server.values["/request/body"] = os.urandom(300_000)
    assert client.get("/request/body") == server.values["/request/body"]
    out = io.BytesIO()
    assert client.get_into("/request/body", out) == 300_000
    assert out.getvalue() == server.values["/request/body"]
    client.set("/response/status", "201")
    client.set("/response/headers/X", b"bytes")
    data = os.urandom(200_000)
    client.set("/response/stream", io.BytesIO(data))
    client.set("/response/cookies/c", io.BytesIO(b"z" * 100_000))
    puts = server.puts()
    assert [r.body for r in puts[:2]] == [b"201", b"bytes"]
    assert b"".join(r.body for r in puts[2:-1]) == data
    assert len(puts) > 4
    assert puts[-1].body == b"z" * 100_000
    client.unset("/response/headers/X")
    assert (server.requests[-1].method, server.requests[-1].path) == (
        "DELETE",
        "/handlers/%s/response/headers/X" % HANDLER,
    )


def test_api_errors(server, monkeypatch):
    client = DataClient(server.url, HANDLER)
    with pytest.raises(DataAPIError) as info:
        client.get("/request/params/x")
    assert (info.value.status, info.value.reason, info.value.detail) == (404, "Resource Item Not Found", None)
    assert str(info.value) == "Resource Item Not Found"
    server.responder = lambda r: json_error(422, "Non Integer Value", "status 'x' is not an integer")
    with pytest.raises(DataAPIError) as info:
        client.set("/response/status", "x")
    assert (info.value.status, info.value.reason) == (422, "Non Integer Value")
    assert info.value.detail == "status 'x' is not an integer"
    assert str(info.value) == "Non Integer Value: status 'x' is not an integer"
    server.responder = None
    out = io.BytesIO()
    with pytest.raises(DataAPIError):
        client.get_into("/request/params/x", out)
    assert out.getvalue() == b""
    with pytest.raises(ValueError):
        client.get("no-slash")
    with pytest.raises(TypeError):
        client.set("/response/body", 12)
    with pytest.raises(DataAPIError) as info:
        DataClient("http://127.0.0.1:%d" % free_port(), HANDLER).get("/request/method")
    assert info.value.status is None
    monkeypatch.delenv("KAPOW_HANDLER_ID", raising=False)
    with pytest.raises(ValueError):
        DataClient(server.url)
    monkeypatch.setenv("KAPOW_HANDLER_ID", "fromenv")
    monkeypatch.setenv("KAPOW_DATA_URL", server.url + "/p")
    DataClient().set("/response/status", b"200")
    assert server.requests[-1].path == "/p/handlers/fromenv/response/status"


@pytest.mark.parametrize(
    "url",
    [
        "https://localhost:8082",
        "localhost:8082",
        "http://",
        "http://h:0",
        "http://h:x",
        "http://[::1",
        "http://u@h:1",
    ],
)
def test_api_bad_urls(url):
    with pytest.raises(ValueError):
        DataClient(url, HANDLER)


def test_ipv6_url():
    try:
        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        seen.append(request)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.close()

    seen = []
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert DataClient("http://[::1]:%d" % port, HANDLER).get("/request/method") == b"ok"
    thread.join(TIMEOUT)
    listener.close()
    assert b"\r\nHost: [::1]:%d\r\n" % port in seen[0]


def test_json_string():
    assert _json_string(b'{"reason": "Handler ID Not Found"}', b"reason") == b"Handler ID Not Found"
    body = b'{ "x": 1, "reason" :"a\\"b\\\\c\\/d\\u00e9\\ud83d\\ude00" }'
    assert _json_string(body, b"reason") == 'a"b\\c/d\u00e9\U0001f600'.encode()
    # raw bytes are kept as sent; half a surrogate pair is U+FFFD
    body = b'{"reason": "\xff\\ud83dx\\ude00"}'
    assert _json_string(body, b"reason") == b"\xff\xef\xbf\xbdx\xef\xbf\xbd"
    assert _json_string(b"not json", b"reason") is None
    assert _json_string(b'{"reason": "unterminated', b"reason") is None
    assert _json_string(b'{"reason": 12}', b"reason") is None
    body = b'{"reason": "Non Integer Value", "detail":\t"status \'x\' is not \\u0061n integer"}'
    assert _json_string(body, b"detail") == b"status 'x' is not an integer"
    assert _json_string(b'{"reason": "R"}', b"detail") is None


def test_is_lean_command():
    assert is_lean_command(["kapow", "get", "/x"])
    assert is_lean_command(["kapow", "set"])
    assert is_lean_command(["kapow", "unset", "/x"])
    assert not is_lean_command(["kapow", "route", "list"])
    assert not is_lean_command(["kapow"])


# Start-up cost: what gets imported


def test_lean_imports(server):
    server.values["/request/method"] = b"GET"
    url = server.url.replace("127.0.0.1", "localhost")
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from kapow.commands.data_client import main\n"
        "rc = main(['kapow', 'get', '--data-url', %r, '--handler', %r,\n"
        "           '/request/method'])\n"
        "sys.stderr.write('\\n' + ' '.join(sorted(sys.modules)))\n"
        "sys.exit(rc)\n" % (SRC, url, HANDLER)
    )
    argv = [sys.executable, "-I", "-S", "-c", code]
    result = subprocess.run(argv, capture_output=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"GET"
    modules = set(result.stderr.decode().split())
    forbidden = {
        "twisted", "treq", "klein", "cryptography", "http", "http.client", "urllib",
        "json", "argparse", "email", "socket", "os", "re", "encodings.idna", "enum",
        "ssl",
    }  # fmt: skip
    assert not (modules & forbidden), modules & forbidden
    kapow_modules = {m for m in modules if m.startswith("kapow")}
    assert kapow_modules == {"kapow", "kapow.commands", "kapow.commands.data_client"}


# The launcher


def test_launcher_file(tmp_path):
    path = write_launcher(str(tmp_path / "bin"))
    assert path == str(tmp_path / "bin" / "kapow")
    assert os.stat(path).st_mode & 0o777 == 0o755
    with open(path) as f:
        source = f.read()
    first = source.splitlines()[0]
    assert first == "#!%s -IS" % os.path.abspath(sys.executable)
    assert repr(os.path.join(SRC, "kapow", "commands")) in source
    assert os.listdir(tmp_path / "bin") == ["kapow"]
    # rewriting replaces the file in place
    assert write_launcher(str(tmp_path / "bin")) == path
    assert os.listdir(tmp_path / "bin") == ["kapow"]


def test_launcher_rejects_unusable_interpreter(tmp_path):
    with pytest.raises(ValueError):
        launcher_source("/" + "p" * MAX_SHEBANG)
    with pytest.raises(ValueError):
        launcher_source("/opt/my python/bin/python3")
    with pytest.raises(ValueError):
        write_launcher(str(tmp_path), "/" + "p" * MAX_SHEBANG)
    assert not (tmp_path / "kapow").exists()


@pytest.fixture
def fake_python_dir(tmp_path):
    """A directory holding ``python`` (a link to the real interpreter)."""
    bindir = tmp_path / "pybin"
    bindir.mkdir()
    os.symlink(os.path.realpath(sys.executable), bindir / "python")
    return bindir


def test_launcher_execs_console_script_for_other_commands(tmp_path, fake_python_dir):
    out = tmp_path / "argv.txt"
    script = fake_python_dir / "kapow"
    script.write_text('#!/bin/sh\nprintf "%%s\\n" "$0" "$@" > %s\n' % out)
    script.chmod(0o755)
    launcher = write_launcher(str(tmp_path / "bin"), str(fake_python_dir / "python"))
    argv = [launcher, "route", "list", "--control-url", "a b"]
    result = subprocess.run(argv, capture_output=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    expected = [str(script), "route", "list", "--control-url", "a b"]
    assert out.read_text().splitlines() == expected


def test_launcher_execs_python_m_kapow_without_script(tmp_path, fake_python_dir):
    # a stand-in ``kapow`` package on PYTHONPATH shows what ``python -m kapow`` got
    pkg = tmp_path / "pypath" / "kapow"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text("import sys\nprint(repr(sys.argv[1:]))\n")
    launcher = write_launcher(str(tmp_path / "bin"), str(fake_python_dir / "python"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "pypath"))
    argv = [launcher, "server", "--debug"]
    result = subprocess.run(argv, capture_output=True, env=env, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == repr(["server", "--debug"])


def test_launcher_never_execs_itself(tmp_path, fake_python_dir):
    # written next to the interpreter, twice: the second time a ``kapow``
    # executable is there already, but it is the launcher itself
    python = str(fake_python_dir / "python")
    for _ in range(2):
        launcher = write_launcher(str(fake_python_dir), python)
    assert launcher == str(fake_python_dir / "kapow")
    with open(launcher) as f:
        source = f.read()
    assert "os.execv(%r, [%r, '-m', 'kapow']" % (python, python) in source


def test_launcher_runs_get_with_linked_python(server, tmp_path, fake_python_dir):
    # -I -S: the launcher needs nothing but the stdlib and the kapow package path
    server.values["/request/method"] = b"GET"
    launcher = write_launcher(str(tmp_path / "bin"), str(fake_python_dir / "python"))
    result = run(launcher, "get", "/request/method", url=server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"GET"


@pytest.mark.parametrize(
    "args",
    [
        ["set", "/response/body", "--handler=other"],
        ["set", "/response/body", "--", "--handler=other"],
        ["set", "--", "/response/body", "--data-url=http://elsewhere"],
    ],
)
def test_values_after_the_resource_are_never_options(args):
    from kapow.commands.data_client import _parse_args

    _, handler, positionals = _parse_args([a.encode() for a in args[1:]], b"set")
    assert handler is None
    assert positionals[0] == b"/response/body" and positionals[1].startswith(b"--")


# The native client's own parts


def test_native_launcher_files(tmp_path):
    native = native_client_or_skip()
    path = write_launcher(str(tmp_path / "bin"), native=native)
    assert sorted(os.listdir(tmp_path / "bin")) == ["kapow", FULL_CLI]
    with open(path, "rb") as f, open(native, "rb") as g:
        assert f.read() == g.read()
    for name in ("kapow", FULL_CLI):
        assert os.stat(tmp_path / "bin" / name).st_mode & 0o777 == 0o755
    # written again: replaced in place
    assert write_launcher(str(tmp_path / "bin"), native=native) == path
    assert sorted(os.listdir(tmp_path / "bin")) == ["kapow", FULL_CLI]


def test_native_hands_other_commands_to_the_full_command_line(tmp_path, fake_python_dir):
    native = native_client_or_skip()
    out = tmp_path / "argv.txt"
    script = fake_python_dir / "kapow"
    script.write_text('#!/bin/sh\nprintf "%%s\\n" "$0" "$@" > %s\n' % out)
    script.chmod(0o755)
    launcher = write_launcher(str(tmp_path / "bin"), str(fake_python_dir / "python"), native=native)
    for argv in (["route", "list", "--control-url", "a b"], ["--help"], []):
        result = subprocess.run([launcher, *argv], capture_output=True, timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert out.read_text().splitlines() == [str(script), *argv]


def test_native_runs_python_m_kapow_without_script(tmp_path, fake_python_dir):
    native = native_client_or_skip()
    pkg = tmp_path / "pypath" / "kapow"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text("import sys\nprint(repr(sys.argv[1:]))\n")
    launcher = write_launcher(str(tmp_path / "my bin"), str(fake_python_dir / "python"), native=native)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "pypath"))
    result = subprocess.run([launcher, "server", "--debug"], capture_output=True, env=env, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == repr(["server", "--debug"])


def test_native_without_the_full_command_line(tmp_path):
    native = native_client_or_skip()
    alone = tmp_path / "kapow"
    shutil.copyfile(native, alone)
    alone.chmod(0o755)
    result = subprocess.run([str(alone), "route", "list"], capture_output=True, timeout=TIMEOUT)
    line = one_error_line(result)
    assert line == "kapow: cannot run the kapow command line %s: No such file or directory" % (
        tmp_path / FULL_CLI
    )


@pytest.mark.parametrize("compiler", [["cc"], ["musl-gcc", "-static"]], ids=["cc", "musl"])
def test_native_source_compiles_warning_free(tmp_path, compiler):
    if shutil.which(compiler[0]) is None:
        pytest.skip("no %s" % compiler[0])
    source = os.path.join(SRC, "kapow", "native", "kapow.c")
    flags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-DKAPOW_GLIBC_TEXTS"]
    argv = [*compiler, *flags, "-o", str(tmp_path / "kapow"), source]
    result = subprocess.run(argv, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""


def test_native_built_with_musl_where_installed():
    """musl's programs start without the GNU C library's processor probing."""
    if shutil.which("musl-gcc") is None or os.environ.get("CC"):
        pytest.skip("musl-gcc is not installed, or $CC chooses the compiler")
    with open(native_client_or_skip(), "rb") as f:
        assert b"glibc" not in f.read()


# Pipes and signals, as handlers meet them


def test_get_into_a_reader_that_goes_away(server, launcher, tmp_path):
    # `kapow get /request/body | head -c1`: the closed pipe ends it quietly, status 1
    server.values["/request/body"] = b"x" * 3_000_000
    script = '"$1" get /request/body | head -c1; echo " ${PIPESTATUS[0]}"'
    result = subprocess.run(
        ["bash", "-c", script, "sh", launcher],
        capture_output=True,
        env=kapow_env(server.url),
        timeout=TIMEOUT,
    )
    assert result.stdout == b"x 1\n"
    assert result.stderr == b""


def test_a_stopped_and_continued_client_carries_on(server, launcher):
    # SIGSTOP/SIGCONT interrupt the calls it is blocked in; it must resume them
    release = threading.Event()

    def respond(record):
        release.wait(TIMEOUT)  # holds the answer to the first PUT
        return None

    server.responder = respond
    proc = start_set_body(launcher, server)
    try:
        proc.stdin.write(b"first ")
        proc.stdin.flush()
        wait = time.monotonic() + TIMEOUT
        while not server.requests:  # the PUT arrived; its answer is held
            assert time.monotonic() < wait
            time.sleep(0.01)
        for _ in range(3):
            proc.send_signal(signal.SIGSTOP)
            time.sleep(0.05)
            proc.send_signal(signal.SIGCONT)
        release.set()
        time.sleep(0.1)  # now blocked reading stdin
        for _ in range(3):
            proc.send_signal(signal.SIGSTOP)
            time.sleep(0.05)
            proc.send_signal(signal.SIGCONT)
        proc.stdin.write(b"second")
        proc.stdin.close()
        assert proc.wait(TIMEOUT) == 0, proc.stderr.read()
    finally:
        release.set()
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert b"".join(r.body for r in server.puts()) == b"first second"
