"""
A real nginx in front of real kapow instances, run as the test's own child
process (``daemon off``, its own pid file, logs and temporary directories) on a
loopback port the test picks; its configuration is contrib/nginx/kapow.conf.

Its prefix directory is made with ``mkdtemp`` directly under the system
temporary directory and opened to traversal (0711): when the tests run as
root, nginx's workers switch to ``nobody``, and they must be able to spool
request bodies into ``client_body_temp_path``. pytest's own ``tmp_path`` is
unusable for that: its parents are private to the user running the tests.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from tests.support.kapowserver import free_port, wait_for

CONTRIB_CONF = Path(__file__).resolve().parents[2] / "contrib" / "nginx" / "kapow.conf"
NGINX = "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else shutil.which("nginx")


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
