"""
kapow.client.ControlClient against a real ``kapow server``, over pinned
mutual TLS: routes, handlers, refused credentials, both ways of building a
client, an IPv6 control address, and the how-to's example program run for real.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
import treq
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, ResponseFailed, ResponseNeverReceived

from kapow.client import ControlClient, ControlError, PinnedControlPolicy
from kapow.commands import control_call
from kapow.core import credentials
from tests.support.kapowserver import KapowServer, curl, wait_for, write_program

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "watch_handlers.py"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class _ServerCase(TestCase):
    """A real server per test, and clients of it."""

    def start(self, *init_programs: str, extra: tuple[str, ...] = ()) -> KapowServer:
        tmp = Path(tempfile.mkdtemp(prefix="kapow-test-client-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        server = KapowServer(tmp, init_programs, extra)
        self.addCleanup(server.stop)
        self.tmp = tmp
        return server

    def client(self, server: KapowServer) -> ControlClient:
        """A client with the credentials the server wrote, as an operator's would be."""
        return ControlClient.from_directory(reactor, server.control, str(server.creds))

    async def refused(self, d: Deferred[Any]) -> ControlError:
        with self.assertRaises(ControlError) as caught:
            await d
        return caught.exception

    async def until(self, check: Any, what: str, timeout: float = 10.0) -> Any:
        """Poll the coroutine function ``check`` until it returns something true."""
        for _ in range(int(timeout / 0.05)):
            found = await check()
            if found:
                return found
            await deferLater(reactor, 0.05)
        self.fail(f"timed out waiting for {what}")


async def _fetch(url: str) -> tuple[int, bytes]:
    """One plain GET, on a connection of its own."""
    response = await Agent(reactor).request(b"GET", url.encode("ascii"))
    return response.code, await treq.content(response)


class RouteTests(_ServerCase):
    async def test_add_list_get_insert_remove(self) -> None:
        server = self.start()
        client = self.client(server)
        self.assertEqual(await client.list_routes(), [])
        hello = await client.add_route(
            "/hello/{name}", "kapow get /request/matches/name | kapow set /response/body"
        )
        self.assertEqual(
            (hello["method"], hello["url_pattern"], hello["entrypoint"], hello["index"]),
            ("GET", "/hello/{name}", "/bin/sh -c", 0),
        )
        self.assertEqual(await _fetch(server.user + "/hello/ana"), (200, b"ana"))

        echo = await client.add_route("/echo", "cat", method="POST", stdin="body", buffer=True)
        first = await client.add_route("/first", "echo first | kapow set /response/body", index=0)
        self.assertEqual(first["index"], 0)
        listing = await client.list_routes()
        self.assertEqual(
            [(r["id"], r["index"]) for r in listing], [(first["id"], 0), (hello["id"], 1), (echo["id"], 2)]
        )
        self.assertEqual(await client.get_route(echo["id"]), {**echo, "index": 2})

        self.assertIsNone(await client.remove_route(hello["id"]))
        self.assertEqual((await _fetch(server.user + "/hello/ana"))[0], 404)
        e = await self.refused(client.get_route(hello["id"]))
        self.assertEqual((e.status, e.reason, str(e)), (404, "Route Not Found", "Route Not Found"))
        e = await self.refused(client.remove_route(hello["id"]))
        self.assertEqual((e.status, e.reason), (404, "Route Not Found"))
        e = await self.refused(client.add_route("/broken/{"))
        self.assertEqual((e.status, e.reason), (422, "Invalid Route"))
        self.assertEqual([r["id"] for r in await client.list_routes()], [first["id"], echo["id"]])


class HandlerTests(_ServerCase):
    async def test_list_get_kill_a_running_handler(self) -> None:
        server = self.start()
        client = self.client(server)
        route = await client.add_route("/slow", "sleep 60")
        answered = Deferred.fromCoroutine(_fetch(server.user + "/slow?q=1"))

        async def running() -> list[dict[str, Any]]:
            return [h for h in await client.list_handlers() if h["state"] == "running"]

        (handler,) = await self.until(running, "a running handler")
        self.assertEqual(
            (handler["route_id"], handler["method"], handler["path"], handler["remote"]),
            (route["id"], "GET", "/slow", "127.0.0.1"),
        )
        self.assertIsInstance(handler["pid"], int)
        shown = await client.get_handler(handler["id"])
        self.assertEqual((shown["id"], shown["pid"]), (handler["id"], handler["pid"]))

        self.assertIsNone(await client.kill_handler(handler["id"]))
        code, _ = await answered
        self.assertEqual(code, 200)

        async def gone() -> bool:
            return not await client.list_handlers()

        await self.until(gone, "the killed handler to go")
        for d in (client.get_handler(handler["id"]), client.kill_handler(handler["id"])):
            e = await self.refused(d)
            self.assertEqual((e.status, e.reason), (404, "Handler Not Found"))


class RefusedTests(_ServerCase):
    """Credentials the server does not pin fail in the TLS handshake, not with ControlError."""

    def assert_tls_failure(self, error: Exception, what: str) -> None:
        self.assertNotIsInstance(error, ControlError)
        self.assertIsInstance(error, (ResponseNeverReceived, ResponseFailed))
        reasons = [reason.value for reason in error.reasons]
        self.assertTrue(any(isinstance(reason, SSL.Error) for reason in reasons), reasons)
        self.assertIn(what, " ".join(str(reason) for reason in reasons))

    async def test_another_client_certificate(self) -> None:
        server = self.start()
        other = credentials.generate_control_credentials("127.0.0.1:1")
        policy = PinnedControlPolicy(
            (server.creds / "server.crt").read_bytes(), other.client_cert_pem, other.client_key_pem
        )
        foreign = ControlClient.pinned(reactor, server.control, policy)
        with self.assertRaises(Exception) as caught:
            await foreign.add_route("/intruder", "true")
        self.assert_tls_failure(caught.exception, "alert")
        self.assertEqual(await self.client(server).list_routes(), [])

    async def test_another_server_certificate(self) -> None:
        server = self.start()
        other = credentials.generate_control_credentials("127.0.0.1:1")
        directory = self.tmp / "other"
        credentials.write_client_credentials(other, str(directory))
        shutil.copy(server.creds / "client.crt", directory / "client.crt")
        shutil.copy(server.creds / "client.key", directory / "client.key")
        stranger = ControlClient.from_directory(reactor, server.control, str(directory))
        with self.assertRaises(Exception) as caught:
            await stranger.list_routes()
        self.assert_tls_failure(caught.exception, "certificate verify failed")

    async def test_no_server(self) -> None:
        server = self.start()
        client = self.client(server)
        server.stop()
        with self.assertRaises(Exception) as caught:
            await client.list_routes()
        self.assertNotIsInstance(caught.exception, ControlError)
        self.assertIn("Connection refused", str(caught.exception))


class ConstructorTests(_ServerCase):
    async def test_from_environ_in_an_init_program(self) -> None:
        """An init program gets KAPOW_CONTROL_URL and the PEM variables from the server."""
        program = Path(tempfile.mkdtemp(prefix="kapow-test-client-init-")) / "init.py"
        self.addCleanup(shutil.rmtree, program.parent, True)
        write_program(
            program,
            f"""#!{sys.executable}
import sys
from twisted.internet.task import react
from kapow.client import ControlClient

async def main(reactor):
    client = ControlClient.from_environ(reactor)
    route = await client.add_route("/from-init", "echo init | kapow set /response/body")
    print("added", route["url_pattern"], "at", client.url, file=sys.stderr)

react(main)
""",
        )
        server = self.start(str(program))
        server.wait_log(r"init\.py exited with status 0", timeout=20)
        self.assertIn(f"added /from-init at {server.control}", server.output())
        self.assertEqual([r["url_pattern"] for r in await self.client(server).list_routes()], ["/from-init"])
        self.assertEqual(await _fetch(server.user + "/from-init"), (200, b"init\n"))

    async def test_from_environ_and_from_directory_reach_the_same_server(self) -> None:
        server = self.start()
        environ = {
            "KAPOW_CONTROL_URL": server.control,
            "KAPOW_CONTROL_SERVER_CERT": (server.creds / "server.crt").read_text(),
            "KAPOW_CONTROL_CLIENT_CERT": (server.creds / "client.crt").read_text(),
            "KAPOW_CONTROL_CLIENT_KEY": (server.creds / "client.key").read_text(),
        }
        added = await ControlClient.from_environ(reactor, environ).add_route("/e")
        self.assertEqual(await self.client(server).get_route(added["id"]), added)


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback address (::1) on this machine")
class IPv6Tests(_ServerCase):
    async def test_an_ipv6_literal_control_url(self) -> None:
        server = self.start(extra=("--control-bind", "[::1]:0"))
        self.assertTrue(server.control.startswith("https://[::1]:"), server.control)
        client = self.client(server)
        added = await client.add_route("/v6", "echo v6 | kapow set /response/body")
        self.assertEqual([r["id"] for r in await client.list_routes()], [added["id"]])
        self.assertEqual((await client.get_route(added["id"]))["url_pattern"], "/v6")
        self.assertEqual(await client.list_handlers(), [])
        e = await self.refused(client.get_handler("nope"))
        self.assertEqual((e.status, e.reason), (404, "Handler Not Found"))
        self.assertIsNone(await client.remove_route(added["id"]))
        self.assertEqual(await client.list_routes(), [])


# -- the command line's client ------------------------------------------------------


def test_the_command_lines_client_fails_with_the_same_error(server: KapowServer) -> None:
    """``kapow route``'s client raises the same ControlError, with the status and reason it knows."""
    context = control_call.context_from_directory(str(server.creds))
    with pytest.raises(ControlError) as caught:
        control_call.call(context, server.control, "GET", "/routes/nope", None, 200)
    e = caught.value
    assert (str(e), e.status, e.reason, e.detail) == ("Route Not Found", 404, "Route Not Found", None)
    shown = server.kapow("route", "get", "nope")
    assert (shown.returncode, shown.stdout, shown.stderr) == (1, "", "kapow: Route Not Found\n")
    server.stop()
    with pytest.raises(ControlError) as caught:
        control_call.call(context, server.control, "GET", "/routes", None, 200)
    e = caught.value
    assert (e.status, e.reason) == (None, None)
    assert str(e).startswith(f"cannot reach control API at {server.control}: "), str(e)


# -- the how-to's program -------------------------------------------------------------


def test_the_watch_handlers_example(start_server: Any) -> None:
    """docs/howto/twisted-client.rst's program: adds its route, reports a request's handler, removes the route."""
    server = start_server()
    env = {**os.environ, "KAPOW_CONTROL_URL": server.control}
    watcher = subprocess.Popen(
        [sys.executable, str(EXAMPLE), str(server.creds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(line.rstrip("\n") for line in watcher.stdout), daemon=True
    )
    reader.start()
    try:
        wait_for(lambda: any(line.startswith("added route ") for line in lines), 20, "the route to be added")
        (route_id,) = re.findall(r"^added route (\S+): GET /slow$", lines[0])
        reply = curl(server.user + "/slow")
        assert (reply.returncode, reply.stdout) == (0, "done\n"), reply.stderr

        def seen(pattern: str) -> list[str]:
            return [m.group(1) for line in list(lines) if (m := re.fullmatch(pattern, line))]

        started = wait_for(lambda: seen(r"\+ (\S+) running: GET /slow from 127\.0\.0\.1"), 10, "the handler")
        wait_for(lambda: seen(r"- (\S+) gone") == started, 10, "the handler to go")
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(15) == 0, watcher.stderr.read()
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    reader.join(5)
    assert lines[-1] == f"removed route {route_id}", lines
    assert server.kapow("route", "list").stdout == "[]\n"
