"""
Scale-out behind nginx: two real kapow instances started from the same init
program, and a real nginx running contrib/nginx/kapow.conf in front of them.

nginx runs as this test's own child process (``daemon off``, its own pid file,
logs and temporary directories), listening on a loopback port the test picks.
Its prefix directory is made with ``mkdtemp`` directly under the system
temporary directory and opened to traversal (0711): when the test runs as
root, nginx's workers switch to ``nobody``, and they must be able to spool
request bodies into ``client_body_temp_path`` (nginx creates those directories
and hands them to the worker user). pytest's own ``tmp_path`` is unusable for
that: its parents are private to the user running the tests.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.kapowserver import KapowServer, curl, wait_for, write_program

CONTRIB_CONF = Path(__file__).resolve().parent.parent / "contrib" / "nginx" / "kapow.conf"
NGINX = "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else shutil.which("nginx")


INIT_PROGRAM = r"""#!/bin/sh
set -e
kapow route add /instance -c 'printf "%s\n" "$KAPOW_INSTANCE" | kapow set /response/body'

kapow route add /client - <<'EOF_COMMAND'
get() { kapow get "$1" 2>/dev/null || printf '(absent)'; }
{
  printf 'version=%s\n' "$(get /request/version)"
  printf 'connection=%s\n' "$(get /request/headers/Connection)"
  printf 'host=%s\n' "$(get /request/host)"
  printf 'x-forwarded-for=%s\n' "$(get /request/headers/X-Forwarded-For)"
  printf 'x-forwarded-proto=%s\n' "$(get /request/headers/X-Forwarded-Proto)"
} | kapow set /response/body
EOF_COMMAND

kapow route add /stream - <<'EOF_COMMAND'
printf 'first from %s\n' "$KAPOW_INSTANCE" | kapow set /response/stream
n=0
while [ ! -e "$GATE" ] && [ "$n" -lt 200 ]; do sleep 0.05; n=$((n + 1)); done
printf 'second\n' | kapow set /response/stream
EOF_COMMAND

kapow route add -X POST /upload - <<'EOF_COMMAND'
sum=$(kapow get /request/body | sha256sum)
printf '%s %s\n' "$KAPOW_INSTANCE" "${sum%% *}" | kapow set /response/body
EOF_COMMAND
"""


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hostport(url: str) -> str:
    m = re.fullmatch(r"http://(127\.0\.0\.1:\d+)/?", url)
    assert m, url
    return m.group(1)


def nginx_conf(prefix: Path, port: int, upstreams: list[str]) -> str:
    """contrib/nginx/kapow.conf with test addresses, inside a complete nginx.conf."""
    site = CONTRIB_CONF.read_text()
    servers = re.findall(r"(?m)^(\s*server )127\.0\.0\.1:\d+( .*;)$", site)
    assert len(servers) == len(upstreams) == 2, "the upstream block should list two instances"
    lines = iter(upstreams)
    site = re.sub(
        r"(?m)^(\s*server )127\.0\.0\.1:\d+( .*;)$",
        lambda m: m.group(1) + next(lines) + m.group(2),
        site,
    )
    site, listens = re.subn(r"(?m)^(\s*)listen 80;$", rf"\g<1>listen 127.0.0.1:{port};", site)
    assert listens == 1
    user = ""
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        user = f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{
    worker_connections 64;
}}
http {{
    access_log {prefix / "access.log"};
{temp}
{site}
}}
"""


class Nginx:
    """
    nginx in the foreground, as a child of the test.

    :param upstreams: the instances, in contrib/nginx/kapow.conf.
    :param conf: makes the whole configuration instead, from the prefix
        directory and the port to listen on.
    """

    def __init__(self, upstreams: list[str], conf: Callable[[Path, int], str] | None = None) -> None:
        self.prefix = Path(tempfile.mkdtemp(prefix="kapow-nginx-"))
        self.prefix.chmod(0o711)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(
            conf(self.prefix, self.port)
            if conf is not None
            else nginx_conf(self.prefix, self.port, upstreams)
        )
        assert NGINX is not None
        self.process = subprocess.Popen(
            [NGINX, "-e", str(self.prefix / "error.log"), "-p", str(self.prefix), "-c", str(self.conf),
             "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(self._answers, 10, "nginx to answer")
        except AssertionError:
            self.stop()
            raise AssertionError("nginx did not start:\n" + self.errors()) from None

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError("nginx exited:\n" + self.errors())
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def errors(self) -> str:
        log = self.prefix / "error.log"
        return log.read_text() if log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        assert self.process.stderr is not None
        self.process.stderr.close()
        shutil.rmtree(self.prefix, ignore_errors=True)


@pytest.fixture
def cluster(start_server: Any, tmp_path: Path) -> Iterator[tuple[list[KapowServer], Nginx, Path]]:
    """Two instances (markers ``a`` and ``b``) and nginx in front of them."""
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    init = write_program(tmp_path / "app.pow", INIT_PROGRAM)
    gate = tmp_path / "gate"
    instances = []
    for marker in ("a", "b"):
        server = start_server(init, env={**os.environ, "KAPOW_INSTANCE": marker, "GATE": str(gate)})
        instances.append(server)
    for server in instances:
        server.wait_log(r"app\.pow exited with status 0")
    proxy = Nginx([hostport(s.user) for s in instances])
    try:
        yield instances, proxy, gate
    finally:
        proxy.stop()


def test_contrib_conf_keeps_what_scale_out_needs() -> None:
    directives = {
        " ".join(line.split("#")[0].split())
        for line in CONTRIB_CONF.read_text().splitlines()
        if line.split("#")[0].strip()
    }
    for needed in (
        "proxy_pass http://kapow;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header Host $http_host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_buffering off;",
    ):
        assert needed in directives, needed
    assert any(d.startswith("keepalive ") for d in directives)


def test_requests_are_spread_over_both_instances(cluster: Any) -> None:
    instances, proxy, _gate = cluster
    for server, marker in zip(instances, "ab", strict=False):
        assert curl(server.user + "/instance").stdout == marker + "\n"
    seen = []
    for _ in range(20):
        result = curl("-w", "%{http_code}", proxy.url + "/instance")
        assert result.returncode == 0, result.stderr
        seen.append(result.stdout)
    assert set(seen) == {"a\n200", "b\n200"}
    assert seen.count("a\n200") >= 5 and seen.count("b\n200") >= 5
    for server in instances:
        server.wait_log(r'"GET /instance HTTP/1\.1" 200 2 ')


def test_handlers_see_the_forwarded_client(cluster: Any) -> None:
    _instances, proxy, _gate = cluster
    result = curl("-H", "X-Forwarded-For: 203.0.113.7", proxy.url + "/client")
    assert result.stdout == (
        "version=HTTP/1.1\n"
        "connection=(absent)\n"
        f"host=127.0.0.1:{proxy.port}\n"
        "x-forwarded-for=203.0.113.7, 127.0.0.1\n"
        "x-forwarded-proto=http\n"
    )


def _lines(stream: IO[bytes]) -> queue.Queue[bytes]:
    lines: queue.Queue[bytes] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(b"")

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_a_stream_passes_through_as_it_is_written(cluster: Any) -> None:
    _instances, proxy, gate = cluster
    request = subprocess.Popen(
        ["curl", "-sS", "-N", "--max-time", "20", proxy.url + "/stream"],
        stdout=subprocess.PIPE,
    )
    try:
        assert request.stdout is not None
        lines = _lines(request.stdout)
        # the handler writes its second line only after the first one got through nginx
        first = lines.get(timeout=5)
        assert re.fullmatch(rb"first from [ab]\n", first), first
        gate.touch()
        assert lines.get(timeout=5) == b"second\n"
        assert lines.get(timeout=5) == b""
        assert request.wait(5) == 0
    finally:
        if request.poll() is None:
            request.kill()
            request.wait()


def test_uploads_larger_than_nginx_buffers(cluster: Any, tmp_path: Path) -> None:
    _instances, proxy, _gate = cluster
    data = os.urandom(300_000)
    payload = tmp_path / "payload"
    payload.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    answers = set()
    for _ in range(4):
        result = curl("--data-binary", f"@{payload}", "-w", "%{http_code}", proxy.url + "/upload")
        marker, _, rest = result.stdout.partition(" ")
        assert rest == expected + "\n200", proxy.errors()
        answers.add(marker)
    assert answers == {"a", "b"}
    assert "buffered to a temporary file" in proxy.errors()
