"""
The data API in memory (StubTreq) against handlers of real user requests:
every resource, every error code and reason of SPEC.md §4.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from klein import Klein
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import log as twisted_log
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IRequest
from zope.interface import implementer

from kapow.core.routes import Route
from kapow.data import api as data_api
from kapow.data.api import DataAPI
from kapow.data.resource import DataResource
from kapow.handlers.handler import Handler, HandlerRegistry, State
from kapow.web.errors import JSONError, install_json_errors
from tests.support.user_connection import (
    MULTIPART,
    PEER,
    ROUTE,
    URLENCODED,
    UserConnection,
    header_values,
    http_request,
    multipart_body,
)

DATA = "http://data/handlers/"
OCTET_STREAM = b"application/octet-stream"


@implementer(ISSLTransport)
class TLSTransport(StringTransport):
    """A user connection over TLS whose client presented ``certificate``."""

    def __init__(self, certificate: x509.Certificate) -> None:
        super().__init__(peerAddress=PEER)
        self.certificate = certificate

    def getPeerCertificate(self) -> x509.Certificate:
        return self.certificate

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def client_certificate() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
            x509.NameAttribute(NameOID.COMMON_NAME, "alice"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


class DataAPITests(TestCase):
    def setUp(self) -> None:
        self.registry = HandlerRegistry()
        self.treq = StubTreq(DataAPI(self.registry).resource())

    def user(
        self,
        raw: bytes | None = None,
        matches: dict[str, str] | None = None,
        transport: StringTransport | None = None,
    ) -> tuple[Handler, UserConnection]:
        connection = UserConnection(http_request() if raw is None else raw, transport=transport)
        return self.registry.create(ROUTE, matches or {}, connection.request), connection

    async def settle(self, d: Any) -> Any:
        """
        The result of ``d``, pumping the in-memory connection. Streamed reads
        (``FileSender``) are pulled by twisted.web's cooperator, which the
        reactor drives, so the reactor turns between pumps.
        """
        out: list[Any] = []

        def keep(result: Any) -> Any:
            out.append(result)
            return result

        d.addBoth(keep)
        deadline = time.monotonic() + 10
        while not out:
            self.assertLess(time.monotonic(), deadline, "no answer")
            self.treq.flush()
            await deferLater(reactor, 0, lambda: None)
        return await d

    async def call(
        self,
        method: str,
        handler: Handler | str,
        resource: str,
        data: bytes | None = None,
    ) -> tuple[int, bytes, bytes]:
        """(status, Content-Type, body) of one data API call."""
        handler_id = handler if isinstance(handler, str) else handler.id
        response = await self.settle(self.treq.request(method, DATA + handler_id + resource, data=data))
        body = await self.settle(response.content())
        self.phrase = response.phrase
        return (
            response.code,
            b", ".join(response.headers.getRawHeaders(b"content-type", [])),
            body,
        )

    async def read(self, handler: Handler, resource: str) -> bytes:
        code, kind, body = await self.call("GET", handler, resource)
        self.assertEqual((code, kind), (200, OCTET_STREAM), (resource, body[:200]))
        return body

    async def write(self, handler: Handler, resource: str, data: bytes) -> None:
        code, _, body = await self.call("PUT", handler, resource, data)
        self.assertEqual((code, body), (200, b""), resource)

    async def assertError(
        self,
        code: int,
        reason: str,
        method: str,
        handler: Handler | str,
        resource: str,
        data: bytes | None = None,
        detail: str | None = None,
    ) -> None:
        """The call is refused with ``code`` and ``reason`` (as the phrase too), and ``detail`` if any."""
        actual, kind, body = await self.call(method, handler, resource, data)
        expected = {"reason": reason} if detail is None else {"reason": reason, "detail": detail}
        self.assertEqual(
            (actual, self.phrase, kind, json.loads(body) if kind == b"application/json" else body),
            (code, reason.encode(), b"application/json", expected),
            f"{method} {resource}",
        )

    # reads

    async def test_request_values(self) -> None:
        handler, _ = self.user(
            http_request(
                b"PATCH",
                b"/caf%C3%A9/a%20b/%FF?q=1&q=2&sp=a+b",
                [
                    (b"Host", b"localhost:8080"),
                    (b"X-Token", b"secret"),
                    (b"Cookie", b"session=abc; Other=1"),
                    (b"Content-Type", URLENCODED),
                ],
                b"f=v&f=w&g=%C3%A9",
            ),
            matches={"name": "world", "rest": "a/b"},
        )
        expected = {
            "/request/method": b"PATCH",
            "/request/host": b"localhost:8080",
            "/request/version": b"HTTP/1.1",
            "/request/path": b"/caf\xc3\xa9/a b/\xff",
            "/request/remote": b"192.0.2.7",
            "/request/matches/name": b"world",
            "/request/matches/rest": b"a/b",
            "/request/params/q": b"1",
            "/request/params/sp": b"a b",
            "/request/headers/X-Token": b"secret",
            "/request/headers/x-token": b"secret",
            "/request/headers/Host": b"localhost:8080",
            "/request/cookies/session": b"abc",
            "/request/cookies/Other": b"1",
            "/request/form/f": b"v",
            "/request/form/g": "é".encode(),
            "/route/id": b"route-1",
        }
        for resource, value in expected.items():
            self.assertEqual(await self.read(handler, resource), value, resource)

    async def test_encoded_item_names(self) -> None:
        handler, _ = self.user(http_request(target=b"/x?a%20b=1&c%2Fd=2"))
        self.assertEqual(await self.read(handler, "/request/params/a%20b"), b"1")

    async def test_body_streams_exact_bytes(self) -> None:
        for size in (0, 1000, 300_000):
            body = os.urandom(size)
            handler, _ = self.user(http_request(b"POST", b"/x", [(b"Host", b"h")], body))
            self.assertEqual(await self.read(handler, "/request/body"), body, size)
            self.assertEqual(await self.read(handler, "/request/body"), body, size)

    async def test_files(self) -> None:
        big = os.urandom(1_100_000)
        small = bytes(range(256)) * 300
        handler, _ = self.user(
            http_request(
                b"POST",
                b"/upload",
                [(b"Host", b"h"), (b"Content-Type", MULTIPART)],
                multipart_body(
                    (b'form-data; name="title"', b"hello"),
                    (b'form-data; name="big"; filename="../../report.bin"', big),
                    (b'form-data; name="small"; filename="s.txt"', small),
                ),
            )
        )
        self.assertEqual(await self.read(handler, "/request/form/title"), b"hello")
        self.assertEqual(await self.read(handler, "/request/files/big/filename"), b"report.bin")
        self.assertEqual(await self.read(handler, "/request/files/big/content"), big)
        self.assertEqual(await self.read(handler, "/request/files/small/filename"), b"s.txt")
        self.assertEqual(await self.read(handler, "/request/files/small/content"), small)
        self.assertEqual(await self.read(handler, "/request/files/big/content"), big)

    async def test_client_certificate_dn(self) -> None:
        handler, _ = self.user(transport=TLSTransport(client_certificate()))
        self.assertEqual(await self.read(handler, "/ssl/client/i/dn"), b"CN=alice,O=Example")

    # errors

    async def test_unknown_handler(self) -> None:
        handler, _ = self.user()
        for method, resource, data in (
            ("GET", "/request/method", None),
            ("GET", "/request/body", None),
            ("PUT", "/response/body", b"x"),
            ("PUT", "/response/status", b"201"),
        ):
            await self.assertError(404, "Handler ID Not Found", method, "0" * 32, resource, data)
        self.assertEqual(await self.read(handler, "/request/method"), b"GET")
        self.registry.forget(handler)
        await self.assertError(404, "Handler ID Not Found", "GET", handler, "/request/method")
        await self.assertError(404, "Handler ID Not Found", "PUT", handler, "/response/body", b"x")

    async def test_invalid_resource_path(self) -> None:
        handler, _ = self.user()
        for method, resource in (
            ("GET", "/request/nope"),
            ("GET", "/request/headers/"),
            ("GET", "/request/body/x"),
            ("GET", "/request/files/"),
            ("GET", "/request/method/extra"),
            ("GET", "/request/files/x"),
            ("GET", "/request/files/x/other"),
            ("GET", "/request/files//content"),
            ("GET", "/request"),
            ("GET", "/response"),
            ("PUT", "/response"),
            ("PUT", "/response/headers"),
            ("PUT", "/response/nope"),
            ("PUT", "/server/log/a/b"),
            ("GET", "/foo/bar"),
            ("GET", "/route"),
            ("GET", "/ssl/client/i"),
        ):
            await self.assertError(
                400,
                "Invalid Resource Path",
                method,
                handler,
                resource,
                b"x" if method == "PUT" else None,
                f"{resource!r} is not a resource of the data API",
            )

    async def test_absent_items(self) -> None:
        handler, _ = self.user(
            http_request(
                target=b"/x?q=1",
                headers=[(b"Host", b"h"), (b"Cookie", b"session=abc")],
            ),
            matches={"name": "v"},
        )
        for resource in (
            "/request/params/absent",
            "/request/headers/X-Absent",
            "/request/cookies/absent",
            "/request/cookies/Session",
            "/request/matches/absent",
            "/request/form/absent",
            "/request/files/absent/filename",
            "/request/files/absent/content",
            "/ssl/client/i/dn",
        ):
            await self.assertError(404, "Resource Item Not Found", "GET", handler, resource)

    async def test_wrong_direction(self) -> None:
        """405; the detail names what the resource takes, unless the data API takes no such method."""
        handler, connection = self.user()
        for method, resource, takes in (
            ("GET", "/response/status", "PUT"),
            ("GET", "/response/body", "PUT"),
            ("GET", "/response/stream", "PUT"),
            ("GET", "/response/headers/X-A", "DELETE or PUT"),
            ("GET", "/response/cookies/c", "DELETE or PUT"),
            ("GET", "/server/log", "PUT"),
            ("PUT", "/request/method", "GET"),
            ("PUT", "/request/body", "GET"),
            ("PUT", "/request/headers/Host", "GET"),
            ("PUT", "/route/id", "GET"),
            ("PUT", "/ssl/client/i/dn", "GET"),
            ("POST", "/request/method", None),
            ("POST", "/response/body", None),
            ("POST", "/response/status", None),
            ("DELETE", "/request/method", "GET"),
            ("DELETE", "/request/headers/Host", "GET"),
            ("DELETE", "/response/status", "PUT"),
            ("DELETE", "/response/body", "PUT"),
            ("DELETE", "/response/reason", "PUT"),
            ("DELETE", "/response/end", "PUT"),
            ("DELETE", "/server/log", "PUT"),
            ("PUT", "/request/headers", "GET"),
            ("PUT", "/request/params", "GET"),
            ("GET", "/response/reason", "PUT"),
            ("GET", "/response/end", "PUT"),
            ("PATCH", "/response/body", None),
        ):
            await self.assertError(
                405,
                "Method Not Allowed",
                method,
                handler,
                resource,
                None if method == "GET" else b"500",
                None if takes is None else f"{resource!r} takes {takes}, not {method}",
            )
        handler.finish()
        code, _, body = connection.response()
        self.assertEqual((code, body), (200, b""))

    async def test_status_writes(self) -> None:
        handler, connection = self.user()
        for raw, code, reason, detail in (
            (b"abc", 422, "Non Integer Value", "status 'abc' is not an integer"),
            (b"", 422, "Non Integer Value", "status '' is not an integer"),
            (b" 2.5\n", 422, "Non Integer Value", "status '2.5' is not an integer"),
            (b"42", 400, "Invalid Status Code", "status '42' is not from 200 to 999"),
            (b"1000", 400, "Invalid Status Code", "status '1000' is not from 200 to 999"),
            (b"9" * 5000, 400, "Invalid Status Code", f"status '{'9' * 80}'... is not from 200 to 999"),
        ):
            await self.assertError(code, reason, "PUT", handler, "/response/status", raw, detail)
        await self.write(handler, "/response/status", b"201")
        await self.write(handler, "/response/status", b" 418\n")
        handler.finish()
        code, _, body = connection.response()
        self.assertEqual((code, body), (418, b""))

    async def test_header_and_cookie_writes(self) -> None:
        handler, connection = self.user()
        await self.write(handler, "/response/headers/X-Multi", b"one\n")
        await self.write(handler, "/response/headers/X-Multi", b"two")
        await self.write(handler, "/response/cookies/session", b"abc\n")
        for bad, character, at in (
            (b"a\rb", r"'\r'", 1),
            (b"v\r\n", r"'\r'", 1),
            (b"a\nb", r"'\n'", 1),
            (b"\x00b", r"'\x00'", 0),
        ):
            detail = f"the header value holds the control character {character} at byte {at}"
            await self.assertError(
                400, "Invalid Header Value", "PUT", handler, "/response/headers/X-Bad", bad, detail
            )
            detail = f"the cookie value holds the control character {character} at byte {at}"
            await self.assertError(
                400, "Invalid Header Value", "PUT", handler, "/response/cookies/bad", bad, detail
            )
        for kind in ("headers", "cookies"):
            name = "header" if kind == "headers" else "cookie"
            await self.assertError(
                400, "Invalid Resource Path", "PUT", handler, f"/response/{kind}/a%20b", b"1",
                f"{name} name 'a b' is not an HTTP token",
            )  # fmt: skip
        handler.finish()
        _, headers, _ = connection.response()
        self.assertEqual(header_values(headers, b"X-Multi"), [b"one", b"two"])
        self.assertEqual(header_values(headers, b"Set-Cookie"), [b"session=abc"])
        self.assertEqual(header_values(headers, b"X-Bad"), [])

    async def test_body_writes_append_and_start_the_response(self) -> None:
        handler, connection = self.user()
        await self.write(handler, "/response/status", b"202")
        big = b"0123456789abcdef" * 8192
        await self.write(handler, "/response/body", b"hello ")
        code, headers, body = connection.response()
        self.assertEqual((code, body), (202, b"hello "))
        self.assertEqual(header_values(headers, b"Content-Type"), [b"text/plain; charset=utf-8"])
        await self.write(handler, "/response/stream", b"world\n")
        await self.write(handler, "/response/body", big)
        await self.assertError(409, "Response Already Started", "PUT", handler, "/response/status", b"500")
        await self.assertError(
            409,
            "Response Already Started",
            "PUT",
            handler,
            "/response/headers/X-A",
            b"1",
        )
        await self.assertError(409, "Response Already Started", "PUT", handler, "/response/cookies/c", b"1")
        handler.finish()
        code, headers, body = connection.response()
        self.assertEqual((code, body), (202, b"hello world\n" + big))
        self.assertEqual(header_values(headers, b"X-A"), [])

    async def test_body_write_waits_for_the_user_connection(self) -> None:
        handler, connection = self.user()
        await self.write(handler, "/response/body", b"first")
        connection.pause()
        pending = self.treq.put(DATA + handler.id + "/response/body", data=b"second")
        for _ in range(5):
            self.treq.flush()
            await deferLater(reactor, 0, lambda: None)
        self.assertNoResult(pending)
        self.assertEqual(connection.response()[2], b"firstsecond")
        connection.resume()
        answer = await self.settle(pending)
        at_once = await self.settle(self.treq.put(DATA + handler.id + "/response/body", data=b"!"))
        self.assertEqual(connection.response()[2], b"firstsecond!")
        # answered later or at once, the same answer: empty, of no type
        for found in (answer, at_once):
            self.assertEqual(found.code, 200)
            self.assertEqual(found.length, 0)  # a Content-Length of 0, not an empty chunked body
            self.assertFalse(found.headers.hasHeader(b"Content-Type"))

    async def test_a_large_body_write_waits_between_chunks(self) -> None:
        handler, connection = self.user()
        await self.write(handler, "/response/body", b"first")
        connection.pause()
        big = bytes(range(256)) * (3 * data_api.CHUNK_SIZE // 256) + b"tail"
        pending = self.treq.put(DATA + handler.id + "/response/body", data=big)
        for _ in range(5):
            self.treq.flush()
            await deferLater(reactor, 0, lambda: None)
        self.assertNoResult(pending)
        self.assertEqual(connection.response()[2], b"first" + big[: data_api.CHUNK_SIZE])
        connection.resume()
        self.assertEqual((await self.settle(pending)).code, 200)
        self.assertEqual(connection.response()[2], b"first" + big)

    async def test_an_end_while_a_large_body_write_waits_answers_that_write(self) -> None:
        handler, connection = self.user()
        await self.write(handler, "/response/body", b"first")
        connection.pause()
        big = bytes(range(256)) * (3 * data_api.CHUNK_SIZE // 256)
        pending = self.treq.put(DATA + handler.id + "/response/body", data=big)
        for _ in range(5):
            self.treq.flush()
            await deferLater(reactor, 0, lambda: None)
        self.assertNoResult(pending)
        ended = await self.settle(self.treq.put(DATA + handler.id + "/response/end", data=b""))
        self.assertEqual(ended.code, 200)
        answer = await self.settle(pending)
        self.assertEqual((answer.code, await answer.json()), (409, {"reason": "Response Already Ended"}))
        connection.resume()
        self.assertEqual(connection.response()[2], b"first" + big[: data_api.CHUNK_SIZE])

    async def test_server_log(self) -> None:
        events: list[dict[str, Any]] = []
        self.patch(data_api.server_log, "observer", events.append)
        handler, _ = self.user()
        await self.write(handler, "/server/log/backup", b"line one\nline two\n")
        await self.write(handler, "/server/log", b"no prefix")
        await self.write(handler, "/server/log/a%1Bb%07c%0Ad%7F%00", b"msg")
        self.assertEqual({e["log_namespace"] for e in events}, {"kapow.handler"})
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                f"{handler.id} backup: line one",
                f"{handler.id} backup: line two",
                f"{handler.id}: no prefix",
                f"{handler.id} abcd: msg",
            ],
        )

    async def test_server_log_next_to_a_legacy_observer(self) -> None:
        events: list[dict[str, Any]] = []

        def legacy(event: dict[str, Any]) -> None:
            pass

        twisted_log.addObserver(legacy)
        self.addCleanup(twisted_log.removeObserver, legacy)
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        handler, _ = self.user()
        await self.write(handler, "/server/log/backup", b"done")
        lines = [formatEvent(e) for e in events if e.get("log_namespace") == "kapow.handler"]
        self.assertEqual(lines, [f"{handler.id} backup: done"])

    # SPEC.md §7

    async def test_success_keeps_the_standard_phrase(self) -> None:
        handler, _ = self.user()
        await self.read(handler, "/request/method")
        self.assertEqual(self.phrase, b"OK")

    async def test_collections(self) -> None:
        handler, _ = self.user(
            http_request(
                b"POST",
                b"/x?p=a%ffb&p=2&q",
                [
                    (b"Host", b"h"),
                    (b"X-Rep", b"1"),
                    (b"X-Rep", b"2"),
                    (b"Cookie", b"a=1; a=2"),
                    (b"Content-Type", URLENCODED),
                ],
                b"f=1&f=2",
            ),
            matches={"name": "world"},
        )
        expected = {
            "/request/params": {"p": ["a\ufffdb", "2"], "q": [""]},
            "/request/headers": {
                "host": ["h"],
                "x-rep": ["1", "2"],
                "cookie": ["a=1; a=2"],
                "content-type": [URLENCODED.decode()],
                "content-length": ["7"],
            },
            "/request/cookies": {"a": ["1", "2"]},
            "/request/form": {"f": ["1", "2"]},
            "/request/files": {},
            "/request/matches": {"name": "world"},
        }
        for resource, value in expected.items():
            code, kind, body = await self.call("GET", handler, resource)
            self.assertEqual((code, kind, json.loads(body)), (200, b"application/json", value), resource)
        self.assertEqual(await self.read(handler, "/request/params/p"), b"a\xffb")

    async def test_files_collection(self) -> None:
        body = multipart_body(
            (b'form-data; name="up"; filename="a.txt"\r\nContent-Type: text/plain', b"hello"),
        )
        handler, _ = self.user(
            http_request(b"POST", b"/x", [(b"Host", b"h"), (b"Content-Type", MULTIPART)], body)
        )
        code, _, data = await self.call("GET", handler, "/request/files")
        self.assertEqual(
            (code, json.loads(data)),
            (200, {"up": [{"filename": "a.txt", "content_type": "text/plain", "size": 5}]}),
        )

    async def test_delete_header_and_cookie(self) -> None:
        handler, connection = self.user()
        await self.write(handler, "/response/headers/X-A", b"1")
        await self.write(handler, "/response/headers/X-A", b"2")
        await self.write(handler, "/response/headers/X-B", b"kept")
        await self.write(handler, "/response/cookies/c", b"1")
        for resource in ("/response/headers/x-a", "/response/cookies/c", "/response/cookies/never"):
            self.assertEqual(await self.call("DELETE", handler, resource), (200, b"", b""), resource)
        await self.assertError(
            400, "Invalid Resource Path", "DELETE", handler, "/response/headers/a%20b",
            detail="header name 'a b' is not an HTTP token",
        )  # fmt: skip
        await self.assertError(
            400, "Invalid Resource Path", "DELETE", handler, "/response/cookies/a;b",
            detail="cookie name 'a;b' is not an HTTP token",
        )  # fmt: skip
        await self.assertError(
            400, "Invalid Resource Path", "DELETE", handler, "/response/headers/",
            detail="'/response/headers/' is not a resource of the data API",
        )  # fmt: skip
        await self.assertError(404, "Handler ID Not Found", "DELETE", "nope", "/response/headers/X-A")
        await self.write(handler, "/response/body", b"x")
        await self.assertError(409, "Response Already Started", "DELETE", handler, "/response/headers/X-B")
        await self.assertError(409, "Response Already Started", "DELETE", handler, "/response/cookies/c")
        handler.finish()
        _, headers, _ = connection.response()
        self.assertEqual(header_values(headers, b"X-A"), [])
        self.assertEqual(header_values(headers, b"X-B"), [b"kept"])
        self.assertEqual(header_values(headers, b"Set-Cookie"), [])

    async def test_reason(self) -> None:
        handler, connection = self.user()
        await self.write(handler, "/response/reason", b"Still Thinking\n")
        for bad, detail in (
            (b"a\r\nX-Injected: 1", r"the reason phrase holds the control character '\r' at byte 1"),
            (b"x" * 257, "the reason phrase is 257 bytes, over 256"),
            (b"nul\x00", r"the reason phrase holds the control character '\x00' at byte 3"),
        ):
            await self.assertError(
                400, "Invalid Reason Phrase", "PUT", handler, "/response/reason", bad, detail
            )
        await self.write(handler, "/response/status", b"202")
        await self.write(handler, "/response/body", b"x")
        await self.assertError(409, "Response Already Started", "PUT", handler, "/response/reason", b"Late")
        handler.finish()
        self.assertTrue(connection.transport.value().startswith(b"HTTP/1.1 202 Still Thinking\r\n"))

    async def test_end(self) -> None:
        handler, connection = self.user(http_request(b"POST", b"/x?q=1", body=b"payload"))
        await self.write(handler, "/response/status", b"202")
        await self.write(handler, "/response/end", b"anything, ignored")
        self.assertTrue(connection.request.finished)
        self.assertIs(handler.state, State.ENDED)
        self.assertEqual(connection.response()[::2], (202, b""))
        for method, resource in (
            ("PUT", "/response/status"),
            ("PUT", "/response/reason"),
            ("PUT", "/response/headers/X-A"),
            ("PUT", "/response/cookies/c"),
            ("PUT", "/response/body"),
            ("PUT", "/response/stream"),
            ("PUT", "/response/end"),
            ("DELETE", "/response/headers/X-A"),
            ("DELETE", "/response/cookies/c"),
        ):
            await self.assertError(409, "Response Already Ended", method, handler, resource, b"1")
        await self.assertError(409, "Response Already Ended", "PUT", handler, "/response/body", b"")
        self.assertEqual(await self.read(handler, "/request/params/q"), b"1")
        self.assertEqual(await self.read(handler, "/request/body"), b"payload")
        await self.write(handler, "/server/log", b"still logging")
        self.assertEqual(connection.response()[::2], (202, b""))

    async def test_a_value_over_the_limit(self) -> None:
        handler, _ = self.user()
        for resource in ("/response/status", "/response/headers/X-A", "/server/log"):
            await self.assertError(
                413, "Request Entity Too Large", "PUT", handler, resource, b"1" * (data_api.MAX_VALUE + 1),
                f"the value is over {data_api.MAX_VALUE} bytes, "
                "the most a status, reason, header, cookie or log line takes",
            )  # fmt: skip
        self.assertEqual(handler.headers, [])

    async def test_end_a_large_value_is_ignored(self) -> None:
        handler, connection = self.user()
        await self.write(handler, "/response/end", b"x" * (data_api.MAX_VALUE + 10))
        self.assertTrue(connection.request.finished)

    async def test_buffer_route_takes_a_late_status(self) -> None:
        connection = UserConnection(http_request())
        route = Route(id="route-b", method="GET", url_pattern="/x", buffer=True)
        handler = self.registry.create(route, {}, connection.request)
        await self.write(handler, "/response/body", b"held")
        await self.write(handler, "/response/status", b"201")
        await self.write(handler, "/response/headers/X-Late", b"1")
        self.assertEqual(connection.transport.value(), b"")
        handler.finish()
        code, headers, body = connection.response()
        self.assertEqual((code, body), (201, b"held"))
        self.assertEqual(header_values(headers, b"X-Late"), [b"1"])
        self.assertEqual(header_values(headers, b"Content-Length"), [b"4"])

    async def test_paths_that_are_not_utf8_or_broken_escapes(self) -> None:
        handler, _ = self.user()
        not_utf8 = "the path is not UTF-8 once percent-decoded"
        broken = "the path has a '%' that is not followed by two hexadecimal digits"
        for method, resource, detail in (
            ("GET", "/request/headers/%ff", not_utf8),
            ("GET", "/request/params/%zz", broken),
            ("GET", "/request/params/a%4", broken),
            ("GET", "/request/params/a%", broken),
            ("PUT", "/response/headers/%c3%28", not_utf8),
            ("DELETE", "/response/headers/%zz", broken),
        ):
            await self.assertError(400, "Invalid Resource Path", method, handler, resource, b"1", detail)
        await self.assertError(
            400, "Invalid Resource Path", "GET", "bad%zzid", "/request/method", detail=broken
        )

    # the Klein app's routing

    async def test_refusals_before_any_route(self) -> None:
        handler, _ = self.user()
        not_utf8 = "the path is not UTF-8 once percent-decoded"
        broken = "the path has a '%' that is not followed by two hexadecimal digits"
        await self.assertError(400, "Invalid Resource Path", "GET", "%ff", "/request/method", detail=not_utf8)
        await self.assertError(
            400, "Invalid Resource Path", "GET", handler, "/request/method%zz", detail=broken
        )
        await self.assertError(
            400, "Invalid Resource Path", "PUT", handler, "/response/headers/X%e9", b"1", not_utf8
        )
        for method in ("POST", "PATCH", "OPTIONS"):
            response = await self.settle(self.treq.request(method, DATA + handler.id + "/request/method"))
            self.assertEqual(
                (response.code, response.phrase, response.headers.getRawHeaders(b"allow")),
                (405, b"Method Not Allowed", [b"GET, HEAD, PUT, DELETE"]),
            )
            self.assertEqual(
                json.loads(await self.settle(response.content())), {"reason": "Method Not Allowed"}
            )

    async def test_wrong_direction_names_no_methods(self) -> None:
        handler, _ = self.user()
        for method, resource in (
            ("GET", "/response/status"),
            ("PUT", "/request/method"),
            ("DELETE", "/route/id"),
        ):
            response = await self.settle(self.treq.request(method, DATA + handler.id + resource, data=b"1"))
            self.assertEqual((response.code, response.headers.getRawHeaders(b"allow")), (405, None), resource)

    async def test_outside_any_handler(self) -> None:
        for path in ("", "other", "handlers", "handlers/", "handlers/x", "handlers/x/"):
            response = await self.settle(self.treq.get("http://data/" + path))
            body = await self.settle(response.content())
            self.assertEqual((response.code, json.loads(body)), (404, {"reason": "Not Found"}), path)

    async def test_every_answer_has_a_length(self) -> None:
        handler, _ = self.user(http_request(b"POST", b"/x", [(b"Host", b"h")], b"payload"))
        for method, resource, data in (
            ("GET", "/request/method", None),
            ("GET", "/request/headers", None),
            ("GET", "/request/body", None),
            ("GET", "/request/nope", None),
            ("GET", "/request/headers/absent", None),
            ("PUT", "/response/status", b"201"),
            ("PUT", "/response/status", b"abc"),
            ("PUT", "/response/body", b"x"),
            ("DELETE", "/response/headers/X-A", None),
        ):
            response = await self.settle(self.treq.request(method, DATA + handler.id + resource, data=data))
            body = await self.settle(response.content())
            self.assertEqual(response.length, len(body), resource)  # a Content-Length, not chunks

    async def test_head_reads_without_a_body(self) -> None:
        handler, _ = self.user(http_request(b"POST", b"/x", [(b"Host", b"h")], b"payload"))
        refused = {
            "reason": "Invalid Resource Path",
            "detail": "'/request/nope' is not a resource of the data API",
        }
        for resource, length in (
            ("/request/method", b"4"),
            ("/request/body", b"7"),
            ("/request/nope", str(len(json.dumps(refused))).encode()),
        ):
            response = await self.settle(self.treq.head(DATA + handler.id + resource))
            self.assertEqual(response.headers.getRawHeaders(b"content-length"), [length], resource)
            self.assertEqual(await self.settle(response.content()), b"", resource)

    async def test_a_route_serves_every_handler(self) -> None:
        """A route looked up for one handler's call answers another's with that one."""
        get, _ = self.user()
        post, _ = self.user(http_request(b"POST", b"/x", body=b"x"))
        for handler, method in ((get, b"GET"), (post, b"POST"), (get, b"GET"), (post, b"POST")):
            self.assertEqual(await self.read(handler, "/request/method"), method)
        await self.write(post, "/response/status", b"201")
        await self.assertError(404, "Handler ID Not Found", "PUT", "-", "/response/status", b"201")
        await self.assertError(404, "Handler ID Not Found", "GET", get.id[:-1], "/request/method")
        self.assertEqual(post.status, 201)
        self.assertEqual(get.status, 200)

    async def test_a_long_name(self) -> None:
        name = b"X-" + b"n" * 400
        handler, _ = self.user(http_request(headers=[(b"Host", b"h"), (name, b"long")]))
        other, _ = self.user()
        self.assertEqual(await self.read(handler, "/request/headers/" + name.decode()), b"long")
        await self.assertError(
            404, "Resource Item Not Found", "GET", other, "/request/headers/" + name.decode()
        )
        await self.assertError(
            400, "Invalid Resource Path", "GET", handler, "/request/headers/" + "n/" * 200,
            detail="'/request/headers/" + "n/" * 31 + "n'... is not a resource of the data API",
        )  # fmt: skip

    async def test_a_handler_id_holding_a_slash(self) -> None:
        handler, _ = self.user()
        await self.assertError(
            400, "Invalid Resource Path", "GET", handler.id + "%2F", "/request/method",
            detail=f"the handler id '{handler.id}/' holds a '/'",
        )  # fmt: skip
        await self.assertError(
            400,
            "Invalid Resource Path",
            "GET",
            "a%2Fb",
            "/request/method",
            detail="the handler id 'a/b' holds a '/'",
        )

    async def test_an_unexpected_error_is_a_json_500(self) -> None:
        class Broken(HandlerRegistry):
            def get(self, handler_id: str) -> Handler | None:
                raise RuntimeError("broken")

        self.treq = StubTreq(DataAPI(Broken()).resource())
        await self.assertError(500, "Internal Server Error", "GET", "x", "/request/method")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class Later:
    """A Klein app served by DataResource whose answers come later, or fail."""

    app = Klein()

    def __init__(self) -> None:
        self.pending: list[Deferred[bytes]] = []

    @app.route("/h/<name>/later", methods=["GET"])
    def later(self, request: IRequest, name: str) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.pending.append(d)
        return d

    @app.route("/h/<name>/fails", methods=["GET"])
    def fails(self, request: IRequest, name: str) -> Deferred[bytes]:
        return fail(JSONError(409, "Too Late"))

    install_json_errors(app)


class DataResourceTests(TestCase):
    """What the data app's resource does with answers that come later."""

    def setUp(self) -> None:
        self.app = Later()
        self.treq = StubTreq(DataResource(self.app.app, JSONError(400, "Bad URL"), "/h/<name>"))

    def test_an_answer_written_when_it_comes(self) -> None:
        answered = self.treq.get("http://data/h/x/later")
        self.treq.flush()
        self.assertNoResult(answered)
        self.app.pending.pop().callback(b"done")
        self.treq.flush()
        response = self.successResultOf(answered)
        self.assertEqual((response.code, self.successResultOf(response.content())), (200, b"done"))

    def test_an_empty_answer_has_no_type(self) -> None:
        answered = self.treq.get("http://data/h/x/later")
        self.treq.flush()
        self.app.pending.pop().callback(b"")
        self.treq.flush()
        response = self.successResultOf(answered)
        self.assertEqual((response.code, response.length), (200, 0))
        self.assertFalse(response.headers.hasHeader(b"content-type"))

    def test_a_failed_answer_is_the_apps_error(self) -> None:
        answered = self.treq.get("http://data/h/x/fails")
        self.treq.flush()
        response = self.successResultOf(answered)
        self.assertEqual(
            (response.code, response.phrase, self.successResultOf(response.content())),
            (409, b"Too Late", b'{"reason": "Too Late"}'),
        )

    def test_an_answer_is_not_cancelled_when_the_caller_goes(self) -> None:
        answered = self.treq.get("http://data/h/x/later")
        self.treq.flush()
        [d] = self.app.pending
        answered.cancel()
        self.failureResultOf(answered)
        self.treq.flush()
        self.assertFalse(d.called)
        d.callback(b"done")  # written to nobody, without an error
        self.treq.flush()

    def test_a_path_that_does_not_decode(self) -> None:
        for path in ("h/%ff/later", "h/x/later%zz", "%e9t%e9"):
            response = self.successResultOf(self.treq.get("http://data/" + path))
            self.assertEqual((response.code, response.phrase), (400, b"Bad URL"), path)

    def test_routes_that_do_not_share_the_prefix(self) -> None:
        with self.assertRaises(ValueError):
            DataResource(self.app.app, JSONError(400, "Bad URL"), "/other/<name>")
        with self.assertRaises(ValueError):
            DataResource(self.app.app, JSONError(400, "Bad URL"), "/h/x")
