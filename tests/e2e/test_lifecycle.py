"""
The request life cycle end to end (SPEC.md §3, §4): a real server, real
``/bin/sh`` handlers using the real ``kapow get``/``kapow set``, and curl.
The tests that take ``server`` run once with each data client handlers can
get: the native one and the Python one.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from kapow.handlers.fast_processes import FastProcesses
from tests.support.kapowserver import KapowServer, curl, wait_for
from tests.support.native import native_client_or_skip

RESOURCES = ["method", "host", "version", "path", "remote"]


def fetch(*args: str, input: bytes | None = None) -> tuple[int, dict[str, list[str]], bytes]:
    """(status, headers by lower-case name, body) of a curl request."""
    result = curl("-s", "-D", "-", *args, input=input or b"")
    assert isinstance(result.stdout, bytes)
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, body


@pytest.fixture(params=["native", "python"])
def server(request: pytest.FixtureRequest, start_server) -> KapowServer:
    """A running server with no routes, whose handlers get one data client or the other."""
    if request.param == "native":
        native_client_or_skip()
    server = start_server(extra=("--data-client", request.param))
    server.wait_log(f"handlers get the {request.param} data client")
    return server


def test_the_native_client_hands_other_commands_over(start_server) -> None:
    native_client_or_skip()
    server = start_server(extra=("--data-client", "native"))
    server.add_route("/v", "kapow --version | kapow set /response/body")
    assert fetch(server.user + "/v")[2].startswith(b"kapow ")


def test_auto_gives_handlers_the_native_client(start_server) -> None:
    path = native_client_or_skip()
    start_server().wait_log(f"handlers get the native data client \\({path}\\)")


def test_hello_and_the_access_log(server: KapowServer) -> None:
    server.add_route("/hello", "echo 'Hello, World!' | kapow set /response/body")
    code, headers, body = fetch("-A", "test-agent", server.user + "/hello?x=1")
    assert (code, body) == (200, b"Hello, World!\n")
    assert headers["content-type"] == ["text/plain; charset=utf-8"]
    line = server.wait_log(
        r'127\.0\.0\.1 ([0-9a-f]{32}) - \[[^\]]+\] "GET /hello\?x=1 HTTP/1\.1" 200 14 "-" "test-agent"'
    )
    assert line.group(1)


def test_no_route_is_404_and_another_method_is_405(server: KapowServer) -> None:
    server.add_route("/only-post", "true", "-X", "POST")
    assert fetch(server.user + "/nothing")[0] == 404
    assert fetch(server.user + "/only-post")[0] == 405
    server.wait_log(r'127\.0\.0\.1 - - \[[^\]]+\] "GET /nothing HTTP/1\.1" 404 ')
    server.wait_log(r'127\.0\.0\.1 - - \[[^\]]+\] "GET /only-post HTTP/1\.1" 405 ')


def test_request_resources(server: KapowServer) -> None:
    script = "; ".join(f"printf '%s=' {name}; kapow get /request/{name}; echo" for name in RESOURCES) + (
        "; printf 'match=%s\\n' \"$(kapow get /request/matches/who)\""
        "; printf 'param=%s\\n' \"$(kapow get /request/params/q)\""
        "; printf 'header=%s\\n' \"$(kapow get /request/headers/x-custom)\""
        "; printf 'hosthdr=%s\\n' \"$(kapow get /request/headers/Host)\""
        "; printf 'cookie=%s\\n' \"$(kapow get /request/cookies/flavour)\""
        "; printf 'route=%s\\n' \"$(kapow get /route/id)\""
    )
    route = server.add_route("/people/{who}/x", f"{{ {script}; }} | kapow set /response/body")
    port = server.user.rsplit(":", 1)[1]
    code, _, body = fetch(
        "-H", "X-Custom: yes", "-b", "flavour=mint; other=1",
        server.user + "/people/Ana%20Mar%C3%ADa/x?q=first;still&q=second",
    )  # fmt: skip
    assert code == 200
    values = dict(line.split("=", 1) for line in body.decode().splitlines())
    assert values == {
        "method": "GET",
        "host": f"127.0.0.1:{port}",
        "version": "HTTP/1.1",
        "path": "/people/Ana María/x",
        "remote": "127.0.0.1",
        "match": "Ana María",
        "param": "second",  # a pair with ";" is dropped, as the reference drops it
        "header": "yes",
        "hosthdr": f"127.0.0.1:{port}",
        "cookie": "mint",
        "route": route["id"],
    }


def test_forms_files_and_a_rereadable_body(server: KapowServer, tmp_path: Path) -> None:
    server.add_route(
        "/form",
        "{ kapow get /request/form/name; echo; kapow get /request/body | wc -c; kapow get /request/body | wc -c; }"
        " | kapow set /response/body",
        "-X", "PUT",
    )  # fmt: skip
    assert (
        fetch("-X", "PUT", "--data", "name=J%C3%BCrgen&name=x", server.user + "/form")[2]
        == b"J\xc3\xbcrgen\n23\n23\n"
    )

    upload = tmp_path / "photo.bin"
    upload.write_bytes(bytes(range(256)) * 1000)
    server.add_route(
        "/upload",
        "kapow get /request/files/doc/filename | kapow set /response/headers/X-Filename;"
        " kapow get /request/form/title | kapow set /response/headers/X-Title;"
        " kapow get /request/files/doc/content | kapow set /response/body",
        "-X", "POST",
    )  # fmt: skip
    code, headers, body = fetch("-F", "title=holiday", "-F", f"doc=@{upload}", server.user + "/upload")
    assert code == 200
    assert headers["x-filename"] == ["photo.bin"] and headers["x-title"] == ["holiday"]
    assert body == upload.read_bytes()
    assert headers["content-type"] == ["application/octet-stream"]


def test_absent_items_fail_the_command(server: KapowServer) -> None:
    server.add_route(
        "/absent",
        "for r in params/p headers/x-none cookies/c form/f files/f/filename matches/m; do"
        '  if kapow get /request/$r; then echo "$r found"; else echo "$r missing"; fi;'
        " done 2>&1 | kapow set /response/body",
    )
    body = fetch(server.user + "/absent")[2].decode()
    for item in ("params/p", "headers/x-none", "cookies/c", "form/f", "files/f/filename", "matches/m"):
        assert f"kapow: Resource Item Not Found\n{item} missing" in body


def test_response_status_headers_cookies_and_sniffing(server: KapowServer) -> None:
    server.add_route(
        "/teapot",
        "echo 418 | kapow set /response/status;"
        " kapow set /response/headers/X-Many one; kapow set /response/headers/X-Many two;"
        " kapow set /response/cookies/session abc;"
        " printf '%s' 'echoed <h1>input</h1> is not html' | kapow set /response/body",
    )
    code, headers, body = fetch(server.user + "/teapot")
    assert code == 418
    assert headers["x-many"] == ["one", "two"]
    assert headers["set-cookie"] == ["session=abc"]
    assert headers["content-type"] == ["text/plain; charset=utf-8"]

    server.add_route("/html", "printf '<!DOCTYPE html><p>hi' | kapow set /response/body")
    assert fetch(server.user + "/html")[1]["content-type"] == ["text/html; charset=utf-8"]
    server.add_route("/binary", "printf 'a\\000b' | kapow set /response/body")
    assert fetch(server.user + "/binary")[1]["content-type"] == ["application/octet-stream"]
    server.add_route(
        "/typed",
        "kapow set /response/headers/Content-Type application/json; echo '{}' | kapow set /response/body",
    )
    assert fetch(server.user + "/typed")[1]["content-type"] == ["application/json"]
    server.add_route("/empty", "kapow set /response/status 201")
    code, headers, body = fetch(server.user + "/empty")
    assert (code, body) == (201, b"")


def test_bad_writes_are_refused_with_a_reason(server: KapowServer, tmp_path: Path) -> None:
    log = tmp_path / "errors"
    server.add_route(
        "/bad",
        "{ kapow set /response/status abc; kapow set /response/status 99;"
        f"  kapow set /response/headers/X-Bad \"$(printf 'a\\rb')\"; }} 2> {log};"
        " echo started | kapow set /response/body;"
        f" kapow set /response/status 500 2>> {log}; kapow set /response/headers/X-Late v 2>> {log}; echo rc=$? >> {log}",
    )
    code, headers, body = fetch(server.user + "/bad")
    assert (code, body) == (200, b"started\n")
    assert "x-bad" not in headers and "x-late" not in headers
    assert log.read_text().splitlines() == [
        "kapow: Non Integer Value: status 'abc' is not an integer",
        "kapow: Invalid Status Code: status '99' is not from 200 to 999",
        "kapow: Invalid Header Value: the header value holds the control character '\\r' at byte 1",
        "kapow: Response Already Started",
        "kapow: Response Already Started",
        "rc=1",
    ]


def test_data_api_codes_for_a_live_and_a_finished_handler(server: KapowServer, tmp_path: Path) -> None:
    server.add_route(
        "/wait", f"echo $KAPOW_HANDLER_ID > {tmp_path}/id; while [ ! -e {tmp_path}/go ]; do sleep 0.02; done"
    )
    request = subprocess.Popen(["curl", "-s", server.user + "/wait"], stdout=subprocess.PIPE)
    handler = wait_for(
        lambda: (tmp_path / "id").exists() and (tmp_path / "id").read_text().strip(), what="handler id"
    )
    base = f"{server.data}/handlers/{handler}"

    def call(method: str, path: str, data: str | None = None) -> tuple[int, str]:
        args = ["-X", method, "-w", "%{http_code}", base + path]
        if data is not None:
            args[2:2] = ["--data-binary", data]
        out = curl(*args).stdout
        return int(out[-3:]), out[:-3]

    assert call("GET", "/request/method") == (200, "GET")
    assert call("GET", "/request/nope") == (
        400,
        '{"reason": "Invalid Resource Path", "detail": "\'/request/nope\' is not a resource of the data API"}',
    )
    assert call("GET", "/request/params/none") == (404, '{"reason": "Resource Item Not Found"}')
    assert call("GET", "/ssl/client/i/dn") == (404, '{"reason": "Resource Item Not Found"}')
    assert call("GET", "/response/status")[0] == 405
    assert call("PUT", "/request/method", "x")[0] == 405
    assert call("PUT", "/response/status", "x") == (
        422,
        '{"reason": "Non Integer Value", "detail": "status \'x\' is not an integer"}',
    )
    assert call("PUT", "/response/status", "1000") == (
        400,
        '{"reason": "Invalid Status Code", "detail": "status \'1000\' is not from 200 to 999"}',
    )
    assert call("PUT", "/server/log/my%07pre%0Afix", "hello from curl") == (200, "")
    (tmp_path / "go").touch()
    request.wait(10)
    server.wait_log(rf"{handler} myprefix: hello from curl")
    assert call("GET", "/request/method") == (404, '{"reason": "Handler ID Not Found"}')


def test_handler_environment_and_session(server: KapowServer, tmp_path: Path) -> None:
    server.add_route(
        "/env",
        "env | grep ^KAPOW_ | sort | kapow set /response/body;"
        " python3 -c 'import os; print(os.getpgid(0) == os.getppid() != os.getpgid(os.getsid(0)))'"
        " | kapow set /response/body",
    )
    body = fetch(server.user + "/env")[2].decode()
    names = [line.split("=", 1)[0] for line in body.splitlines()[:-1]]
    assert names == ["KAPOW_CONTROL_URL", "KAPOW_DATA_URL", "KAPOW_HANDLER_ID"]
    assert f"KAPOW_DATA_URL={server.data}" in body and f"KAPOW_CONTROL_URL={server.control}" in body
    assert body.splitlines()[-1] == "True"


def test_entrypoint_that_cannot_start_is_500(server: KapowServer) -> None:
    server.add_route("/broken", "", "-e", "/nonexistent/program")
    assert fetch(server.user + "/broken")[0] == 500
    server.wait_log(r"cannot start: cannot run /nonexistent/program")
    server.add_route("/empty", "", "-e", "")
    assert fetch(server.user + "/empty")[0] == 500
    server.wait_log(r"cannot start: empty entrypoint")


def test_exit_status_is_logged_and_does_not_change_the_status(server: KapowServer) -> None:
    server.add_route("/fails", "echo partial | kapow set /response/body; exit 3")
    code, _, body = fetch(server.user + "/fails")
    assert (code, body) == (200, b"partial\n")
    server.wait_log(r"handler [0-9a-f]{32} exited with status 3")


def test_response_completes_when_the_process_exits(start_server, tmp_path: Path) -> None:
    server = start_server(extra=("--debug",))
    pidfile = tmp_path / "bg"
    server.add_route("/bg", f"sleep 60 & echo $! > {pidfile}; echo done | kapow set /response/body")
    try:
        code, _, body = fetch("--max-time", "10", server.user + "/bg")
        assert (code, body) == (200, b"done\n")
    finally:
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pid"))
        os.kill(pid, signal.SIGKILL)


def test_debug_logs_handler_output(start_server) -> None:
    server = start_server(extra=("--debug",))
    server.add_route("/talk", "echo to stdout; echo to stderr >&2")
    fetch(server.user + "/talk")
    server.wait_log(r"[0-9a-f]{32}: to stdout")
    server.wait_log(r"[0-9a-f]{32} \(stderr\): to stderr")


def test_response_streams_before_the_handler_ends(server: KapowServer, tmp_path: Path) -> None:
    server.add_route(
        "/stream",
        f"echo first | kapow set /response/stream; while [ ! -e {tmp_path}/go ]; do sleep 0.02; done;"
        " echo second | kapow set /response/stream",
    )
    host, port = server.user.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"first\n" not in received:
            chunk = s.recv(4096)
            assert chunk, received
            received += chunk
        assert b"second" not in received
        (tmp_path / "go").touch()
        while not received.endswith(b"0\r\n\r\n"):
            chunk = s.recv(4096)
            assert chunk
            received += chunk
    assert b"second\n" in received


def test_large_bodies_pass_through(server: KapowServer, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(1 << 20) * 24)
    server.add_route("/echo", "kapow get /request/body | kapow set /response/body", "-X", "POST")
    out = tmp_path / "out"
    result = curl("--data-binary", f"@{big}", "-o", str(out), "-w", "%{http_code}", server.user + "/echo")
    assert result.stdout == "200"
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()


def test_route_changes_do_not_affect_running_requests(server: KapowServer, tmp_path: Path) -> None:
    route = server.add_route(
        "/change",
        f"touch {tmp_path}/started; while [ ! -e {tmp_path}/go ]; do sleep 0.02; done; kapow get /route/id | kapow set /response/body",
    )
    request = subprocess.Popen(["curl", "-s", server.user + "/change"], stdout=subprocess.PIPE)
    wait_for((tmp_path / "started").exists, what="handler start")
    assert server.kapow("route", "remove", route["id"]).returncode == 0
    (tmp_path / "go").touch()
    out, _ = request.communicate(timeout=10)
    assert out.decode() == route["id"]
    assert fetch(server.user + "/change")[0] == 404


@pytest.mark.parametrize("clientauth", [False, True])
def test_user_https_and_client_certificates(start_server, tmp_path: Path, clientauth: bool) -> None:
    from tests.support.pki import make_pki

    pki = make_pki(tmp_path)
    extra = ("--certfile", str(pki.server_chain), "--keyfile", str(pki.server_key))
    if clientauth:
        extra += ("--clientauth", "--clientcafile", str(pki.ca))
    server = start_server(extra=extra)
    assert server.user.startswith("https://")
    server.add_route(
        "/dn", "{ kapow get /ssl/client/i/dn || echo no certificate; } 2>&1 | kapow set /response/body"
    )
    url = server.user.replace("127.0.0.1", "localhost") + "/dn"
    with_cert = curl(
        "--cacert", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key), url
    )
    anonymous = curl("--cacert", str(pki.ca), url)
    if clientauth:
        assert with_cert.stdout == "CN=alice,O=Example"
        assert anonymous.returncode != 0
    else:
        assert anonymous.stdout == "kapow: Resource Item Not Found\nno certificate\n"


def test_a_client_that_does_not_read_holds_the_handler_back(server: KapowServer, tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    done = tmp_path / "done"
    server.add_route("/zeros", f"head -c {size} /dev/zero | kapow set /response/body; touch {done}")
    host, port = server.user.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /zeros HTTP/1.0\r\n\r\n")
        with pytest.raises(AssertionError):
            wait_for(done.exists, timeout=1.0, what="the handler to finish")
        received = 0
        while chunk := s.recv(1 << 20):
            received += len(chunk)
    wait_for(done.exists, what="the handler to finish")
    assert received > size


def test_405_names_the_allowed_methods(server: KapowServer) -> None:
    server.add_route("/thing", "true", "-X", "POST")
    server.add_route("/{any}", "true", "-X", "DELETE")
    code, headers, _ = fetch(server.user + "/thing")
    assert (code, headers["allow"]) == (405, ["DELETE, POST"])


def test_a_single_large_put_from_another_client_streams(server: KapowServer, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(1 << 20) * 8)
    server.add_route(
        "/fed", f"echo $KAPOW_HANDLER_ID > {tmp_path}/id; while [ ! -e {tmp_path}/go ]; do sleep 0.02; done"
    )
    out = tmp_path / "out"
    request = subprocess.Popen(["curl", "-s", "-o", str(out), server.user + "/fed"])
    handler = wait_for(
        lambda: (tmp_path / "id").exists() and (tmp_path / "id").read_text().strip(), what="handler id"
    )
    put = curl("-T", str(big), "-w", "%{http_code}", f"{server.data}/handlers/{handler}/response/body")
    assert put.stdout == "200"
    (tmp_path / "go").touch()
    request.wait(20)
    assert out.read_bytes() == big.read_bytes()


def catches_sigchld(pid: int) -> bool:
    """Whether process ``pid`` has a handler for ``SIGCHLD`` (its ``SigCgt`` in ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGCHLD - 1) & 1)
    raise AssertionError(f"no SigCgt line for {pid}")


@pytest.mark.parametrize(("spawn", "caught"), [("fast", False), ("reactor", True)])
def test_sigchld_wakes_a_server_only_for_the_reactor_s_processes(
    start_server, tmp_path: Path, spawn: str, caught: bool
) -> None:
    """
    With the fast provider every child of a server without workers (its
    handlers, init programs, forkserver and reaper) is reaped through its
    pidfd, and SIGCHLD is left at its default; Twisted's own processes need
    the reactor's handler.
    """
    if spawn == "fast" and FastProcesses.unavailable() is not None:
        pytest.skip(f"no fast spawns here: {FastProcesses.unavailable()}")
    init = tmp_path / "init.pow"
    init.write_text(
        "#!/bin/sh\nkapow route add /v -c 'exit 3'\nkapow route add /ok -c 'echo ok | kapow set /response/body'\n"
    )
    init.chmod(0o755)
    server = start_server(str(init), extra=("--spawn", spawn))
    server.wait_log(r"init\.pow exited with status 0")  # the init program, reaped
    for _ in range(3):
        assert fetch(server.user + "/ok")[::2] == (200, b"ok\n")
        fetch(server.user + "/v")
    server.wait_log(r"exit(ed with)? status 3")  # a handler's exit status, seen
    assert catches_sigchld(server.process.pid) is caught
