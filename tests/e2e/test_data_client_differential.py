"""The native data client against the Python one, on random input.

For each seed, both clients get the same random arguments, environment and
stdin, and a scripted data server gives both the same answers (well-formed,
malformed, refusals, early closes), chosen by the seed and the number of the
request.  They must agree on everything an operator or the server can see:
the exit status, stdout, stderr, and every byte sent to the server.

What the script sends is chosen so that the outcome does not depend on
timing: the server reads each request whole before it answers, and after an
answer that ends the connection it stops writing and reads until the client
closes (no reset can overtake an answer); stdin comes from a regular file, so
reads return the same pieces every time.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import threading
from collections.abc import Callable

import pytest

from kapow.commands.launcher import write_launcher
from tests.support.native import native_client_or_skip

SEEDS = range(400)
HANDLER = "h1d2"
TIMEOUT = 20


class ScriptedServer:
    """A data server on 127.0.0.1 that answers request ``n`` with ``script(n)``:
    the bytes to send and whether to keep the connection open after them."""

    def __init__(self, script: Callable[[int], tuple[bytes, bool]]) -> None:
        self.script = script
        self.lock = threading.Lock()
        self.received: list[bytes] = []  # what each connection sent, in accept order
        self.count = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                index = len(self.received)
                self.received.append(b"")
            thread = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _recv(self, conn: socket.socket, index: int) -> bytes:
        data = conn.recv(65536)
        with self.lock:
            self.received[index] += data
        return data

    def _serve(self, conn: socket.socket, index: int) -> None:
        conn.settimeout(TIMEOUT)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = self._recv(conn, index)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    data = self._recv(conn, index)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                with self.lock:
                    number = self.count
                    self.count += 1
                answer, keep = self.script(number)
                if answer:
                    conn.sendall(answer)
                if not keep:
                    conn.shutdown(socket.SHUT_WR)
                    while self._recv(conn, index):
                        pass
                    return
        except OSError:
            pass
        finally:
            conn.close()

    def replay(self) -> None:
        """Start the script again, for the next client."""
        for thread in self.threads:
            thread.join(TIMEOUT)
        with self.lock:
            self.received, self.count, self.threads = [], 0, []

    def close(self) -> None:
        # shutdown wakes the accept() blocked in the thread; close alone would
        # leave it waiting on a descriptor number the next server may reuse
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.acceptor.join(TIMEOUT)
        for thread in self.threads:
            thread.join(TIMEOUT)


# Random answers


def _json_text(rng: random.Random) -> bytes:
    """The inside of a JSON string: raw bytes and every escape, with half
    surrogate pairs, bad escapes and line breaks among runs of spaces."""
    pieces = [b"caf\xc3\xa9", b"\xff\xfe", b'\\"', b"\\\\", b"\\/", b"\\b\\f\\n\\r\\t", b"\\u00e9",
              b"\\ud83d\\ude00", b"\\ud83d", b"\\ude00", b"\\u0000", b" \n ", b"\\x", b"  "]  # fmt: skip
    return b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 8)))


def _reason_body(rng: random.Random) -> bytes:
    kind = rng.randrange(11)
    if kind == 0:
        return b"not json at all"
    if kind == 1:
        return b'{"reason": "unterminated'
    if kind == 2:
        return b'{ "reason" :\t"' + _json_text(rng) + b'", "x": 1}'
    if kind == 3:
        return b'{"reason": ""}'
    if kind == 4:  # the reason past the first 64 KiB
        return b'{"pad": "' + b"p" * 70000 + b'", "reason": "too far"}'
    if kind == 5:
        return b'{"reason": 12}'
    if kind == 6:  # a detail, before or after the reason
        members = [b'"reason": "' + _json_text(rng) + b'"', b'"detail" :"' + _json_text(rng) + b'"']
        rng.shuffle(members)
        return b"{" + b", ".join(members) + b"}"
    if kind == 7:  # a detail the reason does not get to
        return b'{"reason": "", "detail": "' + _json_text(rng) + b'"}'
    if kind == 8:  # a detail past the first 64 KiB
        return b'{"reason": "R", "pad": "' + b"p" * 70000 + b'", "detail": "too far"}'
    detail = rng.choice([None, None, "", "status 'abc' is not an integer", "x\ny", 12])
    reason = rng.choice(["Resource Item Not Found", "Non Integer Value", "x\ny", "a  b"])
    fields: dict[str, object] = {"reason": reason}
    if detail is not None:
        fields["detail"] = detail
    return json.dumps(fields).encode()


def _chunked(body: bytes, rng: random.Random, broken: bool) -> bytes:
    out = b""
    i = 0
    while i < len(body):
        n = rng.randrange(1, 9000)
        piece = body[i : i + n]
        size = rng.choice(
            [b"%x" % len(piece), b"%X" % len(piece), b"%x;ext=1" % len(piece), b" %x " % len(piece)]
        )
        out += size + b"\r\n" + piece + b"\r\n"
        i += n
    if broken:
        out += rng.choice([b"zz\r\n", b"-1\r\n", b"0x10\r\n", b"5\r\nabcdeXX\r\n", b"5\r\nab", b""])
        return out
    return out + rng.choice([b"0\r\n\r\n", b"0\r\nX-Trailer: 1\r\n\r\n", b"000\r\n\r\n"])


def answer(seed: int, number: int) -> tuple[bytes, bool]:
    """The answer to request ``number`` of the run of ``seed``."""
    rng = random.Random(seed * 7919 + number)
    kind = rng.randrange(20)
    if kind == 0:
        return b"", False  # closes without answering
    if kind == 1:
        return rng.choice([b"garbage\r\n\r\n", b"HTTP/1.1\r\n\r\n", b"HTTX/1.1 200 OK\r\n\r\n",
                           b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"HTTP/1.1 20"]), False  # fmt: skip
    if kind == 2:
        return b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", False
    status = rng.choice([200] * 6 + [201, 204, 304, 400, 404, 405, 409, 422, 500, 101])
    phrase = rng.choice([b"OK", b"Whatever It Says", b"", b"  spaced  out  "])
    if status == 200:
        body = rng.choice([b"", b"GET", rng.randbytes(rng.randrange(1, 200_000))])
    else:
        body = _reason_body(rng)
    version = rng.choice([b"HTTP/1.1"] * 3 + [b"HTTP/1.0"])
    head = [b"%s %d %s" % (version, status, phrase)] if phrase else [b"%s %d" % (version, status)]
    if rng.random() < 0.2:
        head.insert(0, b"HTTP/1.1 100 Continue\r\nX-Early: 1\r\n")  # an interim answer first
    connection = rng.choice([None, b"close", b"keep-alive", b"Keep-Alive, foo", b"CLOSE"])
    if connection is not None:
        head.append(b"Connection: " + connection)
    if rng.random() < 0.2:
        head.append(rng.choice([b"no colon here", b" X-Spaced : v ", b":empty name"]))
    framing = rng.randrange(10)
    framed = True
    if framing < 5:
        length = len(body)
        if rng.random() < 0.1:
            length += rng.choice([-1, 5])
            framed = False
        head.append(
            rng.choice([b"Content-Length: %d", b"content-length:%d ", b"CONTENT-LENGTH:   %d"])
            % max(length, 0)
        )
        data = body
    elif framing < 8:
        head.append(rng.choice([b"Transfer-Encoding: chunked", b"transfer-encoding: gzip, Chunked"]))
        broken = rng.random() < 0.2
        framed = not broken
        data = _chunked(body, rng, broken)
    elif framing == 8:
        head.append(rng.choice([b"Content-Length: +5", b"Content-Length: 1e3", b"Content-Length:"]))
        data, framed = body, False
    else:
        data, framed = body, False  # until the connection closes
    keep = framed and status not in (101,) and rng.random() < 0.7
    return b"\r\n".join(head) + b"\r\n\r\n" + data, keep


# Random command lines

_WEIRD = [
    "",
    " ",
    "a b",
    "\t",
    "\x7f",
    "\u00f1",
    "?",
    "#",
    "%",
    "%2F",
    "%zz",
    "\\",
    '"',
    "'",
    "\udcff",
    "-",
    "--",
    "=",
    "/",
]


def _weird(rng: random.Random) -> str:
    return "".join(rng.choice([*_WEIRD, "x", "params", "name"]) for _ in range(rng.randrange(0, 4)))


def _resource(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind == 0:
        return _weird(rng)
    if kind == 1:
        return "request/method"
    if kind < 4:
        return "/request/" + _weird(rng)
    return rng.choice(["/request/method", "/request/body", "/response/body", "/response/stream",
                       "/response/status", "/response/headers/X-A", "/request/params/a%20b",
                       "/response/cookies/c"])  # fmt: skip


def _data_url(rng: random.Random, port: int, tmp: str) -> str:
    good = "http://127.0.0.1:%d" % port
    return rng.choice([
        good, good, good + "/api/v1/", good + "/p?q#f", "http://localhost:%d" % port,
        "HTTP://127.0.0.1:%d" % port, "http://[127.0.0.1]:%d" % port,
        "https://127.0.0.1:1", "127.0.0.1:1", "http://", "http://h:0", "http://h:x", "http://h:99999999999999999999",
        "http://[::1", "http://[::1]x", "http://u@h:1", "http://:80", "http://127.0.0.1:%d/a b" % port,
        "http://127.0.0.1:%d/\u00f1" % port, "http://no-such-host.invalid:1", "http://127.0.0.1:1",
        "http+unix://" + "%2F" + "x" * 120, "http+unix://%2Fno%2Fsuch.sock", "http+unix://a%00b",
        "http+unix://" + tmp.replace("/", "%2F") + "%2Fnone.sock", "ftp://x", "http:/x",
        "http://127.0.0.1:%d" % port + _weird(rng),
    ])  # fmt: skip


def case(seed: int, port: int, tmp: str) -> tuple[list[str], dict[str, str], bytes]:
    """The argv (after ``kapow``), environment and stdin of ``seed``."""
    rng = random.Random(seed)
    command = rng.choice(["get", "get", "set", "set", "set", "unset"])
    args = [command]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    if rng.random() < 0.8:
        env["KAPOW_DATA_URL"] = (
            _data_url(rng, port, tmp) if rng.random() < 0.3 else "http://127.0.0.1:%d" % port
        )
    if rng.random() < 0.85:
        env["KAPOW_HANDLER_ID"] = rng.choice([HANDLER] * 8 + ["", "a/b", "a b", "\u00e9"])
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
        option = rng.randrange(8)
        if option == 0:
            args += ["--data-url", _data_url(rng, port, tmp)]
        elif option == 1:
            args.append("--data-url=" + _data_url(rng, port, tmp))
        elif option == 2:
            args += ["--handler", rng.choice([HANDLER, "other", "x/y", ""])]
        elif option == 3:
            args.append("--handler=" + rng.choice([HANDLER, "\t"]))
        elif option == 4:
            args.append(rng.choice(["-h", "--help", "--bogus", "-x", "-", "--handler", "--data-url"]))
        elif option == 5:
            args.append("--")
        else:
            args += ["--handler", HANDLER]
    args.append(_resource(rng))
    if command == "set" and rng.random() < 0.4:
        if rng.random() < 0.2:
            args.append("--")
        args.append(rng.choice(["418", "", "caf\u00e9", "\udcff\udcfe", "--handler=x", "-", "a\nb"]))
    if rng.random() < 0.1:
        args.append(_weird(rng) or "extra")
    stdin = rng.choice([b"", b"418\n", rng.randbytes(10), rng.randbytes(65536 + 1), rng.randbytes(200_000)])
    return args, env, stdin


def _run(kapow: str, args: list[str], env: dict[str, str], stdin_path: str) -> subprocess.CompletedProcess:
    with open(stdin_path, "rb") as stdin:
        return subprocess.run([kapow, *args], stdin=stdin, capture_output=True, env=env, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    native = native_client_or_skip()
    python = write_launcher(str(tmp_path_factory.mktemp("py")))
    return python, write_launcher(str(tmp_path_factory.mktemp("native")), native=native)


@pytest.mark.parametrize("block", range(0, len(SEEDS), 50))
def test_native_and_python_clients_agree(clients: tuple[str, str], tmp_path: os.PathLike, block: int) -> None:
    python, native = clients
    stdin_path = os.path.join(tmp_path, "stdin")
    for seed in SEEDS[block : block + 50]:
        server = ScriptedServer(lambda n, seed=seed: answer(seed, n))
        outcomes = []
        try:
            args, env, stdin = case(seed, server.port, str(tmp_path))
            with open(stdin_path, "wb") as f:
                f.write(stdin)
            for kapow in (python, native):
                result = _run(kapow, args, env, stdin_path)
                sent = server.received
                server.replay()
                outcomes.append((result.returncode, result.stdout, result.stderr, sent))
        finally:
            server.close()
        (py_status, py_out, py_err, py_sent), (c_status, c_out, c_err, c_sent) = outcomes
        where = "seed %d: kapow %r" % (seed, args)
        assert (c_status, c_err) == (py_status, py_err), where
        assert c_out == py_out, where
        assert c_sent == py_sent, where
