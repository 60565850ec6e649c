"""
Tests for kapow.handlers.handler: the request snapshot, the response state machine
and the registry, over real twisted.web requests on in-memory connections.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.internet.address import IPv6Address
from twisted.trial.unittest import SynchronousTestCase

from kapow.core.routes import Route
from kapow.handlers.handler import Handler, HandlerRegistry, State, handler_ids
from kapow.web.errors import JSONError
from tests.support.user_connection import (
    BOUNDARY,
    MULTIPART,
    PEER,
    ROUTE,
    URLENCODED,
    UserConnection,
    header_values,
    http_request,
    multipart_body,
)


def make_handler(
    raw: bytes | None = None, matches: dict[str, str] | None = None, peer: Any = PEER
) -> tuple[Handler, UserConnection]:
    connection = UserConnection(http_request() if raw is None else raw, peer)
    handler = Handler("h" * 32, ROUTE, matches or {}, connection.request)
    return handler, connection


class RequestValueTests(SynchronousTestCase):
    def test_method_host_version_path_remote(self) -> None:
        handler, _ = make_handler(
            http_request(
                b"PATCH",
                b"/a%20b/caf%C3%A9/%3F?q=%2Fx&r=1#frag",
                [(b"Host", b"example.test:8080")],
            )
        )
        self.assertEqual(handler.request_value("method"), b"PATCH")
        self.assertEqual(handler.request_value("host"), b"example.test:8080")
        self.assertEqual(handler.request_value("version"), b"HTTP/1.1")
        self.assertEqual(handler.request_value("path"), "/a b/café/?".encode())
        self.assertEqual(handler.request_value("remote"), b"192.0.2.7")

    def test_http10_without_host(self) -> None:
        handler, _ = make_handler(http_request(b"GET", b"/", [], version=b"HTTP/1.0"))
        self.assertEqual(handler.request_value("version"), b"HTTP/1.0")
        self.assertEqual(handler.request_value("host"), b"")

    def test_remote_ipv6(self) -> None:
        handler, _ = make_handler(peer=IPv6Address("TCP", "::1", 40000))
        self.assertEqual(handler.request_value("remote"), b"::1")

    def test_matches(self) -> None:
        handler, _ = make_handler(matches={"name": "world", "path": "a/b", "u": "é"})
        self.assertEqual(handler.request_value("matches", "name"), b"world")
        self.assertEqual(handler.request_value("matches", "path"), b"a/b")
        self.assertEqual(handler.request_value("matches", "u"), "é".encode())
        self.assertIsNone(handler.request_value("matches", "absent"))

    def test_params_first_value(self) -> None:
        handler, _ = make_handler(http_request(target=b"/x?q=1&q=2&empty=&sp=a+b%20c&pct=%26%3D"))
        self.assertEqual(handler.request_value("params", "q"), b"1")
        self.assertEqual(handler.request_value("params", "empty"), b"")
        self.assertEqual(handler.request_value("params", "sp"), b"a b c")
        self.assertEqual(handler.request_value("params", "pct"), b"&=")
        self.assertIsNone(handler.request_value("params", "absent"))
        self.assertIsNone(handler.request_value("params", "Q"))

    def test_params_are_not_form_fields(self) -> None:
        handler, _ = make_handler(
            http_request(
                b"POST",
                b"/x?a=query",
                [(b"Host", b"h"), (b"Content-Type", URLENCODED)],
                b"a=form&b=2",
            )
        )
        self.assertEqual(handler.request_value("params", "a"), b"query")
        self.assertIsNone(handler.request_value("params", "b"))
        self.assertEqual(handler.request_value("form", "a"), b"form")

    def test_headers_case_insensitive(self) -> None:
        handler, _ = make_handler(
            http_request(
                headers=[
                    (b"Host", b"localhost:8080"),
                    (b"X-Token", b"secret"),
                    (b"Accept", b"*/*"),
                ]
            )
        )
        for name in ("X-Token", "x-token", "X-TOKEN"):
            self.assertEqual(handler.request_value("headers", name), b"secret")
        self.assertEqual(handler.request_value("headers", "Host"), b"localhost:8080")
        self.assertEqual(handler.request_value("headers", "host"), b"localhost:8080")
        self.assertEqual(handler.request_value("headers", "accept"), b"*/*")
        self.assertIsNone(handler.request_value("headers", "X-Absent"))

    def test_repeated_header_gives_first_value(self) -> None:
        handler, _ = make_handler(
            http_request(
                headers=[
                    (b"Host", b"h"),
                    (b"X-Multi", b"first"),
                    (b"X-Multi", b"second"),
                ]
            )
        )
        self.assertEqual(handler.request_value("headers", "X-Multi"), b"first")

    def test_cookies(self) -> None:
        handler, _ = make_handler(
            http_request(
                headers=[
                    (b"Host", b"h"),
                    (b"Cookie", b"session=abc123; Other=1; empty="),
                ]
            )
        )
        self.assertEqual(handler.request_value("cookies", "session"), b"abc123")
        self.assertEqual(handler.request_value("cookies", "Other"), b"1")
        self.assertEqual(handler.request_value("cookies", "empty"), b"")
        self.assertIsNone(handler.request_value("cookies", "other"))
        self.assertIsNone(handler.request_value("cookies", "absent"))

    def test_repeated_cookie_gives_the_first(self) -> None:
        # browsers send the cookie with the most specific path first
        handler, _ = make_handler(
            http_request(headers=[(b"Host", b"h"), (b"Cookie", b"session=app; session=root")])
        )
        self.assertEqual(handler.request_value("cookies", "session"), b"app")


class FormTests(SynchronousTestCase):
    def test_urlencoded_any_method(self) -> None:
        for method in (b"POST", b"PUT", b"PATCH", b"DELETE", b"GET"):
            handler, _ = make_handler(
                http_request(
                    method,
                    b"/x",
                    [(b"Host", b"h"), (b"Content-Type", URLENCODED)],
                    b"a=1&a=2&sp=x+y%21",
                )
            )
            self.assertEqual(handler.request_value("form", "a"), b"1", method)
            self.assertEqual(handler.request_value("form", "sp"), b"x y!", method)
            self.assertIsNone(handler.request_value("form", "absent"), method)

    def test_multipart_fields_and_files(self) -> None:
        content = bytes(range(256)) * 4
        body = multipart_body(
            (b'form-data; name="title"', "héllo".encode()),
            (b'form-data; name="upload"; filename="report.bin"', content),
        )
        handler, _ = make_handler(
            http_request(b"PUT", b"/x", [(b"Host", b"h"), (b"Content-Type", MULTIPART)], body)
        )
        self.assertEqual(handler.request_value("form", "title"), "héllo".encode())
        upload = handler.form().file("upload")
        assert upload is not None
        self.assertEqual((upload.filename, upload.read()), ("report.bin", content))
        self.assertIsNone(handler.form().file("title"))

    def test_unparsable_multipart_is_an_empty_form(self) -> None:
        bodies = [
            (
                MULTIPART,
                b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="a"\r\n\r\nno end',
            ),
            (b"multipart/form-data", b"a=1"),
            (MULTIPART, b"garbage without any boundary"),
        ]
        for content_type, body in bodies:
            handler, _ = make_handler(
                http_request(
                    b"POST",
                    b"/x",
                    [(b"Host", b"h"), (b"Content-Type", content_type)],
                    body,
                )
            )
            self.assertIsNone(handler.request_value("form", "a"))
            self.assertEqual((handler.form().fields, handler.form().files), ({}, {}))
            with handler.body() as reader:
                self.assertEqual(reader.read(), body)

    def test_no_form_content_type(self) -> None:
        handler, _ = make_handler(
            http_request(
                b"POST",
                b"/x",
                [(b"Host", b"h"), (b"Content-Type", b"text/plain")],
                b"a=1",
            )
        )
        self.assertIsNone(handler.request_value("form", "a"))


class BodyTests(SynchronousTestCase):
    def check_independent_readers(self, body: bytes, content_type: bytes) -> Handler:
        handler, _ = make_handler(
            http_request(b"POST", b"/x", [(b"Host", b"h"), (b"Content-Type", content_type)], body)
        )
        first = handler.body()
        self.addCleanup(first.close)
        self.assertEqual(first.read(10), body[:10])
        handler.form()
        second = handler.body()
        self.addCleanup(second.close)
        self.assertEqual(second.read(), body)
        self.assertEqual(first.read(), body[10:])
        with handler.body() as third:
            self.assertEqual(third.read(), body)
        return handler

    def test_small_body_in_memory(self) -> None:
        body = b"a=1&b=" + b"x" * 1000
        handler = self.check_independent_readers(body, URLENCODED)
        self.assertEqual(handler.request_value("form", "a"), b"1")

    def test_large_body_in_a_temporary_file(self) -> None:
        body = b"a=1&b=" + bytes(range(256)).hex().encode() * 400
        handler = self.check_independent_readers(body, URLENCODED)
        handler.request.content.fileno()  # twisted.web spooled this body to disk
        self.assertEqual(handler.request_value("form", "a"), b"1")

    def test_large_multipart_file_after_body(self) -> None:
        content = bytes(range(256)) * 600
        body = multipart_body((b'form-data; name="f"; filename="x"', content))
        handler = self.check_independent_readers(body, MULTIPART)
        upload = handler.form().file("f")
        assert upload is not None
        self.assertEqual(upload.read(), content)

    def test_empty_body(self) -> None:
        handler, _ = make_handler()
        with handler.body() as reader:
            self.assertEqual(reader.read(), b"")


class StatusAndHeaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.handler, self.connection = make_handler()

    def assertRefused(self, code: int, reason: str, call: Any, *args: Any) -> None:
        error = self.assertRaises(JSONError, call, *args)
        self.assertEqual((error.code, error.reason), (code, reason))

    def test_status_with_whitespace(self) -> None:
        self.handler.set_status(b" 418\n")
        self.handler.finish()
        self.assertEqual(self.connection.response()[0], 418)

    def test_status_last_write_wins(self) -> None:
        for raw in (b"201", b"503", b"202\n"):
            self.handler.set_status(raw)
        self.handler.finish()
        self.assertEqual(self.connection.response()[0], 202)

    def test_status_bounds(self) -> None:
        self.handler.set_status(b"200")
        self.handler.set_status(b"999")
        self.assertEqual(self.handler.status, 999)

    def test_status_refused(self) -> None:
        self.handler.set_status(b"201")
        for raw in (b"abc", b"", b"\n", b"4 18", b"20.0", b"0x1f", b"418abc"):
            self.assertRefused(422, "Non Integer Value", self.handler.set_status, raw)
        for raw in (b"199", b"1000", b"0", b"-200", b"100"):
            self.assertRefused(400, "Invalid Status Code", self.handler.set_status, raw)
        self.handler.finish()
        self.assertEqual(self.connection.response()[0], 201)

    def test_status_with_too_many_digits(self) -> None:
        self.assertRefused(400, "Invalid Status Code", self.handler.set_status, b"9" * 5000)

    def test_header_values(self) -> None:
        self.handler.add_header("X-Trim", b"value\n")
        self.handler.add_header("X-Tab", b"a\tb")
        self.handler.add_header("X-Multi", b"1")
        self.handler.add_header("X-Multi", b"2\n")
        self.handler.add_header("x-multi", b"3")
        self.handler.finish()
        _, headers, _ = self.connection.response()
        self.assertEqual(header_values(headers, b"X-Trim"), [b"value"])
        self.assertEqual(header_values(headers, b"X-Tab"), [b"a\tb"])
        self.assertEqual(header_values(headers, b"X-Multi"), [b"1", b"2", b"3"])

    def test_header_control_characters_refused(self) -> None:
        for raw in (
            b"a\rb",
            b"a\nb",
            b"a\x00b",
            b"v\r\n",
            b"v\n\n",
            b"\x1b[1m",
            b"a\x7fb",
        ):
            error = self.assertRaises(JSONError, self.handler.add_header, "X-Bad", raw)
            self.assertEqual(error.code, 400)
        self.handler.finish()
        _, headers, _ = self.connection.response()
        self.assertEqual(header_values(headers, b"X-Bad"), [])

    def test_header_name_must_be_a_token(self) -> None:
        for name in ("Bad Name", "X:Y", "", "X\r\nInjected"):
            error = self.assertRaises(JSONError, self.handler.add_header, name, b"v")
            self.assertEqual(error.code, 400)
        self.handler.finish()
        _, headers, _ = self.connection.response()
        self.assertEqual(header_values(headers, b"Injected"), [])

    def test_cookies(self) -> None:
        self.handler.add_cookie("session", b"abc123\n")
        self.handler.add_cookie("spaced", b"a b")
        self.handler.finish()
        _, headers, _ = self.connection.response()
        self.assertEqual(header_values(headers, b"Set-Cookie"), [b"session=abc123", b'spaced="a b"'])

    def test_cookie_control_characters_refused(self) -> None:
        error = self.assertRaises(JSONError, self.handler.add_cookie, "c", b"a\r\nSet-Cookie: x=y")
        self.assertEqual(error.code, 400)


class StreamingTests(SynchronousTestCase):
    def test_first_write_commits_status_and_headers(self) -> None:
        handler, connection = make_handler()
        handler.set_status(b"201")
        handler.add_header("X-A", b"1")
        handler.add_cookie("c", b"v")
        self.assertEqual(connection.transport.value(), b"")
        self.successResultOf(handler.write(b"hello "))
        code, headers, body = connection.response()
        self.assertEqual((code, body), (201, b"hello "))
        self.assertEqual(header_values(headers, b"X-A"), [b"1"])
        self.assertEqual(header_values(headers, b"Set-Cookie"), [b"c=v"])
        self.assertEqual(header_values(headers, b"Content-Type"), [b"text/plain; charset=utf-8"])
        self.successResultOf(handler.write(b"world"))
        handler.finish()
        self.assertEqual(connection.response()[2], b"hello world")
        self.assertTrue(connection.transport.value().endswith(b"0\r\n\r\n"))

    def test_sniffed_content_type(self) -> None:
        cases = [
            (b"plain text\n", b"text/plain; charset=utf-8"),
            (b"  <html><body>x", b"text/html; charset=utf-8"),
            (b"\x89PNG\r\n\x1a\n", b"image/png"),
            (b"\x00\x01\x02binary", b"application/octet-stream"),
            (b"hi <script>alert(1)</script>", b"text/plain; charset=utf-8"),
        ]
        for first, expected in cases:
            handler, connection = make_handler()
            handler.write(first)
            handler.write(b"<html>")
            handler.finish()
            _, headers, body = connection.response()
            self.assertEqual(header_values(headers, b"Content-Type"), [expected], first)
            self.assertEqual(body, first + b"<html>")

    def test_explicit_content_type_kept(self) -> None:
        for name in ("Content-Type", "content-type"):
            handler, connection = make_handler()
            handler.add_header(name, b"application/json")
            handler.write(b"<html>")
            handler.finish()
            _, headers, _ = connection.response()
            self.assertEqual(header_values(headers, b"Content-Type"), [b"application/json"])

    def test_changes_after_first_write_refused(self) -> None:
        handler, connection = make_handler()
        handler.write(b"x")
        for call, args in (
            (handler.set_status, (b"500",)),
            (handler.add_header, ("X-Late", b"1")),
            (handler.add_cookie, ("late", b"1")),
        ):
            error = self.assertRaises(JSONError, call, *args)
            self.assertEqual((error.code, error.reason), (409, "Response Already Started"))
        handler.finish()
        code, headers, body = connection.response()
        self.assertEqual((code, body), (200, b"x"))
        self.assertEqual(
            header_values(headers, b"X-Late") + header_values(headers, b"Set-Cookie"),
            [],
        )

    def test_changes_after_finish_refused(self) -> None:
        handler, _ = make_handler()
        handler.finish()
        error = self.assertRaises(JSONError, handler.set_status, b"500")
        self.assertEqual(error.code, 409)

    def test_empty_write_does_not_commit(self) -> None:
        handler, connection = make_handler()
        self.successResultOf(handler.write(b""))
        handler.set_status(b"202")
        handler.finish()
        self.assertEqual(connection.response()[0], 202)

    def test_write_waits_while_client_is_paused(self) -> None:
        handler, connection = make_handler()
        self.successResultOf(handler.write(b"one"))
        connection.pause()
        waiting = handler.write(b"two")
        self.assertNoResult(waiting)
        also = handler.write(b"three")
        self.assertNoResult(also)
        self.assertEqual(connection.response()[2], b"onetwothree")
        connection.resume()
        self.successResultOf(waiting)
        self.successResultOf(also)
        self.successResultOf(handler.write(b"four"))

    def test_client_gone_releases_writes_and_drops_later_ones(self) -> None:
        handler, connection = make_handler()
        handler.write(b"one")
        connection.pause()
        waiting = handler.write(b"two")
        self.assertNoResult(waiting)
        connection.lose()
        self.successResultOf(waiting)
        sent = connection.transport.value()
        self.successResultOf(handler.write(b"dropped"))
        handler.finish()
        handler.finish()
        self.assertEqual(connection.transport.value(), sent)

    def test_stop_producing_releases_writes(self) -> None:
        handler, connection = make_handler()
        handler.write(b"one")
        handler.pauseProducing()
        waiting = handler.write(b"two")
        self.assertNoResult(waiting)
        handler.stopProducing()
        self.successResultOf(waiting)
        sent = connection.transport.value()
        self.successResultOf(handler.write(b"dropped"))
        self.assertEqual(connection.transport.value(), sent)

    def test_client_gone_before_any_write(self) -> None:
        handler, connection = make_handler()
        connection.lose()
        self.successResultOf(handler.write(b"x"))
        handler.finish()
        self.assertEqual(connection.transport.value(), b"")

    def test_finish_releases_pending_writes(self) -> None:
        handler, connection = make_handler()
        handler.write(b"a")
        connection.pause()
        waiting = handler.write(b"b")
        handler.finish()
        self.successResultOf(waiting)
        self.assertEqual(connection.response()[2], b"ab")

    def test_finish_without_body(self) -> None:
        handler, connection = make_handler()
        handler.set_status(b"418")
        handler.add_header("X-A", b"1")
        handler.finish()
        code, headers, body = connection.response()
        self.assertEqual((code, body), (418, b""))
        self.assertEqual(header_values(headers, b"X-A"), [b"1"])
        self.assertTrue(connection.request.finished)

    def test_finish_twice(self) -> None:
        handler, connection = make_handler()
        handler.write(b"body")
        handler.finish()
        sent = connection.transport.value()
        handler.finish()
        self.successResultOf(handler.write(b"late"))
        self.assertEqual(connection.transport.value(), sent)
        self.assertEqual(connection.response()[2], b"body")


class RegistryTests(SynchronousTestCase):
    def test_create_get_forget(self) -> None:
        registry = HandlerRegistry()
        other = Route(id="route-2", method="GET", url_pattern="/y")
        a = registry.create(ROUTE, {"m": "1"}, UserConnection(http_request()).request)
        b = registry.create(ROUTE, {}, UserConnection(http_request()).request)
        c = registry.create(other, {}, UserConnection(http_request()).request)
        self.assertEqual(len(registry), 3)
        self.assertIs(registry.get(a.id), a)
        self.assertEqual((a.route, a.matches), (ROUTE, {"m": "1"}))
        self.assertEqual([registry.get(h.id) for h in (a, b, c)], [a, b, c])
        self.assertEqual(c.route, other)
        registry.forget(a)
        registry.forget(a)
        self.assertIsNone(registry.get(a.id))
        self.assertIs(registry.get(b.id), b)
        self.assertEqual(len(registry), 2)
        self.assertIsNone(registry.get("0" * 32))

    def test_ids_unique_hex(self) -> None:
        registry = HandlerRegistry()
        ids = [registry.create(ROUTE, {}, UserConnection(http_request()).request).id for _ in range(200)]
        self.assertEqual(len(set(ids)), 200)  # across several batches of randomness
        for handler_id in ids:
            self.assertRegex(handler_id, re.compile(r"\A[0-9a-f]{32}\Z"))

    def test_ids_with_a_prefix(self) -> None:
        for prefix in ("00a1", "abc"):
            new_id = handler_ids(prefix, batch=8)
            ids = [new_id() for _ in range(20)]
            self.assertEqual(len(set(ids)), 20)
            for handler_id in ids:
                self.assertRegex(handler_id, re.compile(rf"\A{prefix}[0-9a-f]{{{32 - len(prefix)}}}\Z"))

    def test_created_handler_gets_flow_control(self) -> None:
        registry = HandlerRegistry()
        connection = UserConnection(http_request())
        handler = registry.create(ROUTE, {}, connection.request)
        connection.pause()
        self.assertNoResult(handler.write(b"x"))


class TimeOutTests(SynchronousTestCase):
    def test_before_any_body(self) -> None:
        handler, connection = make_handler()
        handler.set_status(b"201")
        handler.add_header("X-A", b"1")
        handler.time_out()
        code, headers, body = connection.response()
        self.assertEqual((code, body), (504, b"Gateway Timeout\n"))
        self.assertEqual(header_values(headers, b"Content-Type"), [b"text/plain; charset=utf-8"])
        self.assertEqual(header_values(headers, b"X-A"), [])
        self.assertTrue(connection.request.finished)
        self.assertTrue(connection.transport.value().endswith(b"0\r\n\r\n"))
        self.assertFalse(connection.transport.disconnecting)
        sent = connection.transport.value()
        self.successResultOf(handler.write(b"late"))
        handler.finish()
        self.assertEqual(connection.transport.value(), sent)

    def test_after_streaming_started(self) -> None:
        handler, connection = make_handler()
        handler.write(b"partial")
        connection.pause()
        waiting = handler.write(b" more")
        self.assertNoResult(waiting)
        handler.time_out()
        self.successResultOf(waiting)
        self.assertTrue(connection.transport.disconnecting)
        sent = connection.transport.value()
        self.assertFalse(sent.endswith(b"0\r\n\r\n"))
        code, _, body = connection.response()
        self.assertEqual((code, body), (200, b"partial more"))
        self.assertFalse(connection.request.finished)
        self.successResultOf(handler.write(b"dropped"))
        handler.finish()
        self.assertEqual(connection.transport.value(), sent)

    def test_on_a_finished_handler(self) -> None:
        handler, connection = make_handler()
        handler.write(b"body")
        handler.finish()
        sent = connection.transport.value()
        handler.time_out()
        self.assertEqual(connection.transport.value(), sent)
        self.assertFalse(connection.transport.disconnecting)
        self.assertEqual(connection.response()[:1], (200,))
        self.assertEqual(connection.response()[2], b"body")

    def test_after_the_client_left(self) -> None:
        handler, connection = make_handler()
        connection.lose()
        handler.time_out()
        self.assertEqual(connection.transport.value(), b"")
        self.successResultOf(handler.write(b"x"))
        handler.finish()
        self.assertEqual(connection.transport.value(), b"")


class ClientLostTests(SynchronousTestCase):
    def make(self) -> tuple[Handler, UserConnection, list[None]]:
        handler, connection = make_handler()
        calls: list[None] = []
        handler.on_client_lost = lambda: calls.append(None)
        return handler, connection, calls

    def test_lost_before_any_body(self) -> None:
        handler, connection, calls = self.make()
        connection.lose()
        self.assertEqual(len(calls), 1)
        handler.finish()
        self.assertEqual(len(calls), 1)

    def test_lost_while_streaming(self) -> None:
        handler, connection, calls = self.make()
        handler.write(b"partial")
        connection.lose()
        self.assertEqual(len(calls), 1)
        self.assertTrue(handler.client_gone)

    def test_not_called_when_lost_after_finish(self) -> None:
        handler, connection, calls = self.make()
        handler.write(b"body")
        handler.finish()
        connection.lose()
        handler.stopProducing()
        self.assertEqual(calls, [])

    def test_stop_producing_then_connection_lost(self) -> None:
        handler, connection, calls = self.make()
        handler.stopProducing()
        self.assertEqual(len(calls), 1)
        connection.lose()
        self.assertEqual(len(calls), 1)

    def test_connection_lost_then_stop_producing(self) -> None:
        handler, connection, calls = self.make()
        handler.write(b"x")
        connection.lose()
        handler.stopProducing()
        self.assertEqual(len(calls), 1)


class AbandonTests(SynchronousTestCase):
    def test_abandon_releases_the_body_and_the_request(self) -> None:
        before = len(os.listdir("/proc/self/fd"))
        # a body this large is spooled to a file, which the handler keeps open
        handler, connection = make_handler(http_request(b"POST", body=b"x" * 200_000))
        self.assertGreater(len(os.listdir("/proc/self/fd")), before)
        handler.abandon()
        connection.request.content.close()
        self.assertIs(handler.state, State.FINISHED)
        self.assertIsNone(connection.request.producer)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)


def status_line(connection: UserConnection) -> bytes:
    """The status line the user's connection got."""
    return connection.transport.value().partition(b"\r\n")[0]


def routed_handler(raw: bytes | None = None, **options: Any) -> tuple[Handler, UserConnection]:
    """A handler of a route with ``options`` (SPEC.md §7 route fields)."""
    connection = UserConnection(http_request() if raw is None else raw)
    route = Route(id="route-2", method="GET", url_pattern="/x", **options)
    return Handler("b" * 32, route, {}, connection.request), connection


class CollectionTests(SynchronousTestCase):
    def collection(self, handler: Handler, kind: str) -> Any:
        return json.loads(handler.request_collection(kind))

    def test_params_every_value_in_order(self) -> None:
        handler, _ = make_handler(http_request(target=b"/x?p=a%ffb&p=2&q&sp=a+b&e=&p=3;x=1&&p=%zz&p=4"))
        self.assertEqual(
            self.collection(handler, "params"),
            {"p": ["a\ufffdb", "2", "4"], "q": [""], "sp": ["a b"], "e": [""]},
        )
        self.assertEqual(handler.request_value("params", "p"), b"a\xffb")
        self.assertEqual(handler.request_value("params", "q"), b"")

    def test_params_dropped_as_go_drops_them(self) -> None:
        """A pair with ``;`` or a broken escape is not there, as in the reference."""
        handler, _ = make_handler(http_request(target=b"/x?a=%zz&b=1;2&c=%4&d=%41&e%=1&f=%%41"))
        self.assertEqual(self.collection(handler, "params"), {"d": ["A"]})
        for name in ("a", "b", "c", "e", "f"):
            self.assertIsNone(handler.request_value("params", name))

    def test_no_query(self) -> None:
        handler, _ = make_handler()
        self.assertEqual(self.collection(handler, "params"), {})

    def test_headers_lower_case_every_value(self) -> None:
        handler, _ = make_handler(
            http_request(headers=[(b"Host", b"h"), (b"X-Rep", b"1"), (b"x-rep", b"2"), (b"X-Bin", b"\xff")])
        )
        self.assertEqual(
            self.collection(handler, "headers"), {"host": ["h"], "x-rep": ["1", "2"], "x-bin": ["\ufffd"]}
        )

    def test_cookies_every_value(self) -> None:
        handler, _ = make_handler(
            http_request(headers=[(b"Host", b"h"), (b"Cookie", b"a=1; b=2; a=3"), (b"Cookie", b"c=; junk")])
        )
        self.assertEqual(self.collection(handler, "cookies"), {"a": ["1", "3"], "b": ["2"], "c": [""]})

    def test_form_and_files(self) -> None:
        body = multipart_body(
            (b'form-data; name="f"', b"v1"),
            (b'form-data; name="f"', b"v2"),
            (b'form-data; name="up"; filename="a.txt"', b"hello"),
            (b'form-data; name="up"; filename="b.bin"', b"\x00" * 10),
        )
        handler, _ = make_handler(
            http_request(b"POST", b"/x", [(b"Host", b"h"), (b"Content-Type", MULTIPART)], body)
        )
        self.assertEqual(self.collection(handler, "form"), {"f": ["v1", "v2"]})
        self.assertEqual(
            self.collection(handler, "files"),
            {
                "up": [
                    {"filename": "a.txt", "content_type": None, "size": 5},
                    {"filename": "b.bin", "content_type": None, "size": 10},
                ]
            },
        )

    def test_matches(self) -> None:
        handler, _ = make_handler(matches={"name": "wörld", "raw": "\udcff"})
        self.assertEqual(self.collection(handler, "matches"), {"name": "wörld", "raw": "\ufffd"})


class StdinTests(SynchronousTestCase):
    def read_all(self, fd: int) -> bytes:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)

    def check(self, body: bytes) -> None:
        handler, _ = make_handler(http_request(b"POST", b"/x", [(b"Host", b"h")], body))
        first, second = handler.stdin(), handler.stdin()
        try:
            self.assertEqual(os.read(first, 3), body[:3])
            self.assertEqual(self.read_all(second), body)
            handler.finish()  # the handler lets go of the body; the descriptors keep it
            self.assertEqual(self.read_all(first), body[3:])
        finally:
            os.close(first)
            os.close(second)

    def test_small_body(self) -> None:
        self.check(b"small body")

    def test_body_in_a_temporary_file(self) -> None:
        self.check(os.urandom(300_000))

    def test_empty_body(self) -> None:
        handler, _ = make_handler()
        fd = handler.stdin()
        self.addCleanup(os.close, fd)
        self.assertEqual(os.read(fd, 10), b"")


class RemoveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.handler, self.connection = make_handler()

    def test_header_written_twice(self) -> None:
        self.handler.add_header("X-A", b"1")
        self.handler.add_header("X-B", b"keep")
        self.handler.add_header("x-a", b"2")
        self.handler.remove_header("X-a")
        self.handler.add_header("X-A", b"3")
        self.handler.remove_header("X-Never-Written")
        self.handler.finish()
        _, headers, _ = self.connection.response()
        self.assertEqual(header_values(headers, b"X-A"), [b"3"])
        self.assertEqual(header_values(headers, b"X-B"), [b"keep"])

    def test_cookie(self) -> None:
        self.handler.add_cookie("session", b"1")
        self.handler.add_cookie("other", b"2")
        self.handler.add_header("Set-Cookie", b"session=raw; Path=/")
        self.handler.add_cookie("session2", b"3")
        self.handler.remove_cookie("session")
        self.handler.finish()
        _, headers, _ = self.connection.response()
        self.assertEqual(header_values(headers, b"Set-Cookie"), [b"other=2", b"session2=3"])

    def test_content_type_removed_is_sniffed_again(self) -> None:
        self.handler.add_header("Content-Type", b"text/html")
        self.handler.remove_header("content-type")
        self.handler.write(b"\x00\x01")
        self.handler.finish()
        _, headers, _ = self.connection.response()
        self.assertEqual(header_values(headers, b"Content-Type"), [b"application/octet-stream"])

    def test_after_start_refused(self) -> None:
        self.handler.add_header("X-A", b"1")
        self.handler.add_cookie("c", b"1")
        self.handler.write(b"body")
        for call in (self.handler.remove_header, self.handler.remove_cookie):
            name = "X-A" if call == self.handler.remove_header else "c"
            error = self.assertRaises(JSONError, call, name)
            self.assertEqual((error.code, error.reason), (409, "Response Already Started"))
        self.handler.finish()
        _, headers, _ = self.connection.response()
        self.assertEqual(header_values(headers, b"X-A"), [b"1"])
        self.assertEqual(header_values(headers, b"Set-Cookie"), [b"c=1"])

    def test_name_must_be_a_token(self) -> None:
        for call in (self.handler.remove_header, self.handler.remove_cookie):
            error = self.assertRaises(JSONError, call, "a b")
            self.assertEqual((error.code, error.reason), (400, "Invalid Resource Path"))


class ReasonTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.handler, self.connection = make_handler()

    def assertRefused(self, code: int, reason: str, call: Any, *args: Any) -> None:
        error = self.assertRaises(JSONError, call, *args)
        self.assertEqual((error.code, error.reason), (code, reason))

    def test_reason_in_the_status_line(self) -> None:
        self.handler.set_status(b"202")
        self.handler.set_reason(b"Queued For Later\n")
        self.handler.finish()
        self.assertEqual(status_line(self.connection), b"HTTP/1.1 202 Queued For Later")

    def test_last_write_wins_and_empty_is_the_standard_phrase(self) -> None:
        self.handler.set_reason(b"Fine")
        self.handler.set_reason(b"")
        self.handler.set_status(b"404")
        self.handler.finish()
        self.assertEqual(status_line(self.connection), b"HTTP/1.1 404 Not Found")

    def test_bad_reasons_refused_and_change_nothing(self) -> None:
        self.handler.set_reason(b"Kept\ttab")
        for raw in (b"a\rb", b"a\nb", b"a\x00", b"x\n\n", b"\x1b[1m", b"r" * 257):
            self.assertRefused(400, "Invalid Reason Phrase", self.handler.set_reason, raw)
        self.handler.set_reason(b"r" * 256)
        self.handler.set_reason(b"Kept\ttab")
        self.handler.finish()
        self.assertEqual(status_line(self.connection), b"HTTP/1.1 200 Kept\ttab")

    def test_after_start_refused(self) -> None:
        self.handler.write(b"x")
        self.assertRefused(409, "Response Already Started", self.handler.set_reason, b"Late")
        self.handler.finish()
        self.assertEqual(status_line(self.connection), b"HTTP/1.1 200 OK")


class EndTests(SynchronousTestCase):
    def make(self, raw: bytes | None = None) -> tuple[Handler, UserConnection, list[None]]:
        handler, connection = make_handler(raw)
        lost: list[None] = []
        handler.on_client_lost = lambda: lost.append(None)
        return handler, connection, lost

    def assertEnded(self, call: Any, *args: Any) -> None:
        error = self.assertRaises(JSONError, call, *args)
        self.assertEqual((error.code, error.reason), (409, "Response Already Ended"))

    def test_end_while_pending(self) -> None:
        handler, connection, lost = self.make(
            http_request(b"POST", b"/x?q=1", [(b"Host", b"h"), (b"X-A", b"v")], b"the body")
        )
        handler.set_status(b"202")
        handler.add_header("X-Job", b"7")
        handler.end()
        self.assertIs(handler.state, State.ENDED)
        self.assertTrue(connection.request.finished)
        code, headers, body = connection.response()
        self.assertEqual((code, body), (202, b""))
        self.assertEqual(header_values(headers, b"X-Job"), [b"7"])
        self.assertTrue(connection.transport.value().endswith(b"0\r\n\r\n"))
        # the client leaving now ends nothing; the request stays readable
        connection.lose()
        self.assertEqual(lost, [])
        self.assertEqual(handler.request_value("params", "q"), b"1")
        self.assertEqual(handler.request_value("headers", "X-A"), b"v")
        with handler.body() as body_reader:
            self.assertEqual(body_reader.read(), b"the body")
        self.assertEqual(json.loads(handler.request_collection("headers"))["x-a"], ["v"])

    def test_end_while_streaming(self) -> None:
        handler, connection, _ = self.make()
        handler.write(b"partial")
        handler.end()
        self.assertTrue(connection.request.finished)
        self.assertEqual(connection.response()[::2], (200, b"partial"))
        self.assertTrue(connection.transport.value().endswith(b"0\r\n\r\n"))

    def test_writes_after_end_refused(self) -> None:
        handler, connection, _ = self.make()
        handler.end()
        sent = connection.transport.value()
        for call, args in (
            (handler.set_status, (b"500",)),
            (handler.set_reason, (b"Late",)),
            (handler.add_header, ("X-A", b"1")),
            (handler.add_cookie, ("c", b"1")),
            (handler.remove_header, ("X-A",)),
            (handler.remove_cookie, ("c",)),
            (handler.write, (b"late",)),
            (handler.end, ()),
        ):
            self.assertEnded(call, *args)
        self.assertEqual(connection.transport.value(), sent)

    def test_exit_after_end(self) -> None:
        handler, connection, _ = self.make()
        handler.end()
        sent = connection.transport.value()
        handler.finish()
        self.assertIs(handler.state, State.FINISHED)
        self.assertEqual(connection.transport.value(), sent)

    def test_time_out_after_end(self) -> None:
        handler, connection, _ = self.make()
        handler.end()
        sent = connection.transport.value()
        handler.time_out()
        self.assertIs(handler.state, State.FINISHED)
        self.assertEqual(connection.transport.value(), sent)
        self.assertFalse(connection.transport.disconnecting)

    def test_end_releases_a_waiting_write(self) -> None:
        handler, connection, _ = self.make()
        handler.write(b"x")
        connection.pause()
        waiting = handler.write(b"y")
        self.assertNoResult(waiting)
        handler.end()
        self.successResultOf(waiting)

    def test_end_after_the_client_left(self) -> None:
        handler, connection, lost = self.make()
        connection.lose()
        handler.end()
        self.assertIs(handler.state, State.ENDED)
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual(len(lost), 1)


class BufferTests(SynchronousTestCase):
    def test_held_until_exit_with_late_status_and_headers(self) -> None:
        handler, connection = routed_handler(buffer=True)
        self.successResultOf(handler.write(b"<html>hello "))
        self.successResultOf(handler.write(b"world"))
        self.assertEqual(connection.transport.value(), b"")
        handler.set_status(b"201")
        handler.set_reason(b"Made")
        handler.add_header("X-A", b"1")
        handler.add_cookie("c", b"v")
        handler.finish()
        self.assertEqual(status_line(connection), b"HTTP/1.1 201 Made")
        _, headers, body = connection.response()
        self.assertEqual(body, b"<html>hello world")
        self.assertEqual(header_values(headers, b"Content-Length"), [b"17"])
        self.assertEqual(header_values(headers, b"Transfer-Encoding"), [])
        self.assertEqual(header_values(headers, b"Content-Type"), [b"text/html; charset=utf-8"])
        self.assertEqual(header_values(headers, b"Set-Cookie"), [b"c=v"])
        self.assertTrue(connection.request.finished)

    def test_large_body_goes_through_a_temporary_file(self) -> None:
        handler, connection = routed_handler(buffer=True)
        data = os.urandom(3 * 1024 * 1024 + 5)
        for i in range(0, len(data), 65536):
            handler.write(data[i : i + 65536])
        handler.finish()
        code, headers, body = connection.response()
        self.assertEqual((code, len(body)), (200, len(data)))
        self.assertEqual(body, data)
        self.assertEqual(header_values(headers, b"Content-Length"), [str(len(data)).encode()])
        self.assertTrue(connection.request.finished)

    def test_held_body_waits_for_a_paused_client(self) -> None:
        handler, connection = routed_handler(buffer=True)
        data = os.urandom(200_000)
        handler.write(data)
        connection.pause()
        handler.finish()
        self.assertEqual(connection.transport.value(), b"")
        self.assertFalse(connection.request.finished)
        connection.resume()
        self.assertEqual(connection.response()[2], data)
        self.assertTrue(connection.request.finished)

    def test_client_gone_while_the_held_body_is_sent(self) -> None:
        handler, connection = routed_handler(buffer=True)
        handler.write(os.urandom(200_000))
        connection.pause()
        handler.finish()
        connection.lose()
        self.assertIsNone(handler._sending)

    def test_no_body(self) -> None:
        handler, connection = routed_handler(buffer=True)
        handler.set_status(b"204")
        handler.finish()
        self.assertEqual(connection.response()[::2], (204, b""))
        self.assertTrue(connection.request.finished)

    def test_head_request(self) -> None:
        handler, connection = routed_handler(http_request(b"HEAD"), buffer=True)
        handler.write(b"12345")
        handler.finish()
        code, headers, body = connection.response()
        self.assertEqual((code, body), (200, b""))
        self.assertEqual(header_values(headers, b"Content-Length"), [b"5"])
        self.assertTrue(connection.request.finished)

    def test_end_sends_the_held_response_at_once(self) -> None:
        handler, connection = routed_handler(buffer=True)
        handler.write(b"done")
        handler.set_status(b"202")
        handler.end()
        self.assertEqual(connection.response()[::2], (202, b"done"))
        self.assertTrue(connection.request.finished)
        error = self.assertRaises(JSONError, handler.write, b"more")
        self.assertEqual(error.reason, "Response Already Ended")
        handler.finish()
        self.assertEqual(connection.response()[2], b"done")

    def test_time_out_gives_504(self) -> None:
        handler, connection = routed_handler(buffer=True)
        handler.write(b"never sent")
        handler.set_reason(b"Custom")
        handler.time_out()
        code, _, body = connection.response()
        self.assertEqual((code, body), (504, b"Gateway Timeout\n"))
        self.assertEqual(status_line(connection), b"HTTP/1.1 504 Gateway Time-out")

    def test_client_gone_drops_the_held_body(self) -> None:
        handler, connection = routed_handler(buffer=True)
        handler.write(b"x")
        connection.lose()
        self.successResultOf(handler.write(b"y"))
        handler.finish()
        self.assertEqual(connection.transport.value(), b"")


class FailTests(SynchronousTestCase):
    def test_buffered_failure_keeps_the_body(self) -> None:
        handler, connection = routed_handler(buffer=True, error_status=500)
        handler.write(b"what went wrong\n")
        handler.set_reason(b"All Fine")
        self.assertTrue(handler.fail(500))
        handler.finish()
        self.assertEqual(status_line(connection), b"HTTP/1.1 500 Internal Server Error")
        self.assertEqual(connection.response()[2], b"what went wrong\n")

    def test_own_error_status_kept(self) -> None:
        handler, connection = make_handler()
        handler.set_status(b"418")
        handler.set_reason(b"Teapot Here")
        self.assertTrue(handler.fail(500))
        handler.finish()
        self.assertEqual(status_line(connection), b"HTTP/1.1 418 Teapot Here")

    def test_late_status_under_buffer(self) -> None:
        handler, connection = routed_handler(buffer=True)
        handler.write(b"x")
        handler.set_status(b"503")
        self.assertTrue(handler.fail(500))
        handler.finish()
        self.assertEqual(connection.response()[0], 503)

    def test_after_the_response_started(self) -> None:
        handler, connection = make_handler()
        handler.write(b"streamed")
        self.assertFalse(handler.fail(500))
        handler.finish()
        self.assertEqual(connection.response()[::2], (200, b"streamed"))

    def test_after_end(self) -> None:
        handler, connection = make_handler()
        handler.end()
        self.assertFalse(handler.fail(500))
        self.assertEqual(connection.response()[0], 200)
