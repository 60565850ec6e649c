"""
The client's address behind a real nginx: contrib/nginx/kapow.conf with
X-Forwarded-For to a server started with --trusted-proxies, and
contrib/nginx/kapow-proxy-protocol.conf (``proxy_protocol on``) to a
``haproxy:`` bind; alone and with --workers 2. The client connects from
127.0.0.2, nginx from 127.0.0.1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.kapowserver import KapowServer, curl, free_port
from tests.support.nginx import NGINX, Nginx, hostport, nginx_conf

STREAM_CONF = Path(__file__).resolve().parents[2] / "contrib" / "nginx" / "kapow-proxy-protocol.conf"
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
CLIENT = "127.0.0.2"

REMOTE = "kapow get /request/remote | kapow set /response/body"


def client_curl(*args: str) -> Any:
    return curl("--interface", CLIENT, *args)


@pytest.fixture(params=[(), ("--workers", "2")], ids=["one", "workers"])
def workers(request: Any) -> tuple[str, ...]:
    return request.param


@pytest.fixture
def behind_nginx(start_server: Any, workers: tuple[str, ...]) -> Iterator[tuple[KapowServer, Nginx]]:
    if NGINX is None:
        pytest.skip("nginx is not installed")
    server = start_server(extra=("--trusted-proxies", "127.0.0.1/32,::1", *workers))
    server.add_route("/remote", REMOTE)
    server.add_route("/near", "echo ok | kapow set /response/body", "--allow", f"{CLIENT}/32")
    proxy = Nginx([hostport(server.user)] * 2)
    try:
        yield server, proxy
    finally:
        proxy.stop()


def test_the_client_behind_nginx_is_the_forwarded_address(behind_nginx: Any) -> None:
    server, proxy = behind_nginx
    assert client_curl(proxy.url + "/remote").stdout == CLIENT
    # what the client claims itself comes left of what nginx saw: not believed
    assert client_curl("-H", "X-Forwarded-For: 203.0.113.9", proxy.url + "/remote").stdout == CLIENT
    assert client_curl("-w", "%{http_code}", proxy.url + "/near").stdout == "ok\n200"
    server.wait_log(rf'{re.escape(CLIENT)} [0-9a-f]{{32}} - \[[^\]]+\] "GET /remote HTTP/1\.1" 200 ')
    # a peer that is no trusted proxy cannot name another address
    assert client_curl("-H", "X-Forwarded-For: 10.0.0.1", server.user + "/remote").stdout == CLIENT
    assert curl(
        "-H", "X-Forwarded-For: 10.0.0.1", "--interface", "127.0.0.3", server.user + "/near"
    ).stdout == ("Forbidden\n")
    # garbage from a trusted peer: the peer's own address
    assert curl("-H", "X-Forwarded-For: not an address", server.user + "/remote").stdout == "127.0.0.1"
    assert curl("-H", "Forwarded: for=198.51.100.4", server.user + "/remote").stdout == "198.51.100.4"


def stream_conf(instances: list[str]) -> Any:
    def build(prefix: Path, port: int) -> str:
        site = STREAM_CONF.read_text()
        lines = iter(instances)
        site = re.sub(
            r"(?m)^(\s*server )127\.0\.0\.1:\d+( .*;)$", lambda m: m.group(1) + next(lines) + m.group(2), site
        )
        site, listens = re.subn(r"(?m)^(\s*)listen 80;$", rf"\g<1>listen 127.0.0.1:{port};", site)
        assert listens == 1
        # the http {} part only to run nginx: its own temporary paths
        http = nginx_conf(prefix, free_port(), ["127.0.0.1:1", "127.0.0.1:1"])
        return f"load_module {STREAM_MODULE};\n{http}\nstream {{\n{site}\n}}\n"

    return build


def test_the_client_through_the_proxy_protocol_is_the_proxied_address(
    start_server: Any, workers: tuple[str, ...]
) -> None:
    if NGINX is None or not os.path.exists(STREAM_MODULE):
        pytest.skip("nginx with its stream module is not installed (apt-get install libnginx-mod-stream)")
    server = start_server(extra=("--bind", "haproxy:127.0.0.1:0", *workers))
    server.add_route("/remote", REMOTE)
    server.add_route("/near", "echo ok | kapow set /response/body", "--allow", f"{CLIENT}/32")
    proxy = Nginx([], conf=stream_conf([hostport(server.user)] * 2))
    try:
        assert client_curl(proxy.url + "/remote").stdout == CLIENT
        assert client_curl(proxy.url + "/near").stdout == "ok\n"
        assert curl(proxy.url + "/near").stdout == "Forbidden\n"
        server.wait_log(rf'{re.escape(CLIENT)} [0-9a-f]{{32}} - \[[^\]]+\] "GET /remote HTTP/1\.1" 200 ')
        # without a PROXY header the connection is closed: nothing is served
        direct = curl("-w", "%{http_code}", server.user + "/remote")
        assert direct.stdout == "000" and direct.returncode != 0
    finally:
        proxy.stop()
