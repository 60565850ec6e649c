"""The control API in memory (StubTreq): every call, every error shape."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from kapow.control import api as control_api
from kapow.control.api import ControlAPI
from kapow.core.routes import RouteTable
from kapow.web.errors import bounded_request_factory

URL = "http://control"


class ControlAPITests(SynchronousTestCase):
    def setUp(self) -> None:
        ids = iter(f"id-{n}" for n in range(100))
        self.routes = RouteTable()
        self.api = ControlAPI(routes=self.routes, new_id=lambda: next(ids))
        self.treq = StubTreq(self.api.resource())

    def call(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, str, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = self.successResultOf(self.treq.request(method, URL + path, data=data))
        content = self.successResultOf(response.content())
        kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode()
        self.phrase = response.phrase
        return response.code, kind, json.loads(content) if content else None

    def test_append_list_get_delete(self) -> None:
        code, kind, route = self.call("POST", "/routes", {"method": "GET", "url_pattern": "/a"})
        self.assertEqual((code, kind), (201, "application/json"))
        self.assertEqual(
            route,
            {
                "id": "id-0",
                "method": "GET",
                "url_pattern": "/a",
                "entrypoint": "/bin/sh -c",
                "command": "",
                "index": 0,
            },
        )
        self.call("POST", "/routes", {"method": "POST", "url_pattern": "/b", "command": "x", "extra": [1]})
        code, _, listing = self.call("GET", "/routes")
        self.assertEqual((code, [(r["id"], r["index"]) for r in listing]), (200, [("id-0", 0), ("id-1", 1)]))
        self.assertNotIn("extra", listing[1])
        self.assertEqual(self.call("GET", "/routes/id-1")[2]["index"], 1)
        self.assertEqual(self.call("DELETE", "/routes/id-0")[:1], (204,))
        self.assertEqual(self.call("GET", "/routes/id-1")[2]["index"], 0)

    def test_insert_positions(self) -> None:
        for n in range(3):
            self.call("POST", "/routes", {"method": "GET", "url_pattern": f"/{n}"})
        self.assertEqual(self.call("PUT", "/routes", {"method": "GET", "url_pattern": "/x"})[2]["index"], 0)
        code, _, late = self.call("PUT", "/routes", {"method": "GET", "url_pattern": "/y", "index": 99})
        self.assertEqual((code, late["index"]), (201, 4))
        self.assertEqual(
            self.call("PUT", "/routes", {"method": "GET", "url_pattern": "/z", "index": 2})[2]["index"], 2
        )
        listing = self.call("GET", "/routes")[2]
        self.assertEqual([r["url_pattern"] for r in listing], ["/x", "/0", "/z", "/1", "/2", "/y"])
        self.assertEqual([r["index"] for r in listing], list(range(6)))

    def assertRefused(
        self, method: str, path: str, body: Any, raw: bytes | None, code: int, reason: str, detail: str | None
    ) -> None:
        """The call is refused with ``code`` and ``reason`` (as the phrase too), and ``detail`` if any."""
        expected = {"reason": reason} if detail is None else {"reason": reason, "detail": detail}
        got = self.call(method, path, body, raw)
        self.assertEqual(got, (code, "application/json", expected), (method, path, body, raw))
        self.assertEqual(self.phrase, reason.encode(), (method, path))

    def test_errors(self) -> None:
        malformed, invalid = (400, "Malformed JSON"), (422, "Invalid Route")
        route = {"method": "GET", "url_pattern": "/a"}
        cases = [
            ("POST", "/routes", None, b"{", *malformed,
             "invalid JSON at line 1, column 2 (char 1): expecting property name enclosed in double quotes"),
            ("POST", "/routes", None, b"\xff\xfe", *malformed, "invalid JSON at line 1, column 1 (char 0): expecting value"),
            ("POST", "/routes", None, b'{"a": "\xff"}', *malformed, "the body is not utf-8 text: invalid start byte at byte 7"),
            ("PUT", "/routes", None, b"[1,", *malformed, "invalid JSON at line 1, column 4 (char 3): expecting value"),
            ("POST", "/routes", None, b'{"method": "GET"}\n{}', *malformed, "invalid JSON at line 2, column 1 (char 18): extra data"),
            ("POST", "/routes", None, b"", *malformed, "the body is empty, not JSON"),
            ("POST", "/routes", None, b"1" * 5000, *malformed,
             "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"),
            ("POST", "/routes", None, b"[" * 100_000, *malformed,
             "the body nests lists or objects deeper than the JSON parser goes"),
            ("POST", "/routes", {"url_pattern": "/a"}, None, *invalid, "method is missing"),
            ("POST", "/routes", {"method": "GET", "url_pattern": None}, None, *invalid, "url_pattern is missing"),
            ("POST", "/routes", {"method": "", "url_pattern": "/a"}, None, *invalid, "method is empty"),
            ("POST", "/routes", {"method": "GET", "url_pattern": ""}, None, *invalid, "url_pattern is empty"),
            ("POST", "/routes", {"method": "GET", "url_pattern": "a"}, None, *invalid,
             "url_pattern 'a' does not start with '/'"),
            ("POST", "/routes", {"method": "GET", "url_pattern": "/{a"}, None, *invalid,
             "unbalanced braces in url_pattern '/{a'"),
            ("POST", "/routes", {"method": "GET", "url_pattern": "/a}"}, None, *invalid,
             "unbalanced braces in url_pattern '/a}'"),
            ("POST", "/routes", {"method": "GET", "url_pattern": "/{a:(}"}, None, *invalid,
             "regex '(' of placeholder 'a' does not compile: missing ), unterminated subpattern at position 0"),
            ("POST", "/routes", {"method": "GET", "url_pattern": "/x/{id:[0-9}"}, None, *invalid,
             "regex '[0-9' of placeholder 'id' does not compile: unterminated character set at position 0"),
            ("POST", "/routes", {"method": "GET", "url_pattern": "/x/{a}/{a}"}, None, *invalid,
             "placeholder name 'a' appears twice in url_pattern '/x/{a}/{a}'"),
            ("POST", "/routes", {"method": "GET", "url_pattern": "/{:x}"}, None, *invalid,
             "placeholder '{:x}' has no name"),
            ("POST", "/routes", {"method": "GET", "url_pattern": "/{a:(x)\\1}"}, None, *invalid,
             "the placeholder regexes of url_pattern '/{a:(x)\\\\1}' do not compile together: "
             "cannot refer to an open group"),
            ("POST", "/routes", {"method": "GE T", "url_pattern": "/a"}, None, *invalid,
             "method 'GE T' is not an HTTP token (no spaces or separators)"),
            ("POST", "/routes", {"method": 1, "url_pattern": "/a"}, None, *invalid, "method must be a string, not 1"),
            ("POST", "/routes", {"method": "GET", "url_pattern": ["/a"]}, None, *invalid,
             "url_pattern must be a string, not a list"),
            ("POST", "/routes", {**route, "command": 3}, None, *invalid, "command must be a string, not 3"),
            ("POST", "/routes", {**route, "entrypoint": {}}, None, *invalid, "entrypoint must be a string, not an object"),
            ("POST", "/routes", {**route, "entrypoint": "sh 'c"}, None, *invalid,
             "entrypoint \"sh 'c\" cannot be split into words: No closing quotation"),
            ("POST", "/routes", [], None, *invalid, "a route must be a JSON object, not a list"),
            ("PUT", "/routes", {**route, "index": -1}, None, *invalid, "index must be a whole number >= 0, not -1"),
            ("PUT", "/routes", {**route, "index": "1"}, None, *invalid, "index must be a whole number >= 0, not '1'"),
            ("PUT", "/routes", {**route, "index": 1.5}, None, *invalid, "index must be a whole number >= 0, not 1.5"),
            ("PUT", "/routes", {**route, "index": True}, None, *invalid, "index must be a whole number >= 0, not true"),
            ("GET", "/routes/nope", None, None, 404, "Route Not Found", None),
            ("DELETE", "/routes/nope", None, None, 404, "Route Not Found", None),
            ("GET", "/elsewhere", None, None, 404, "Not Found", None),
            ("PATCH", "/routes", None, None, 405, "Method Not Allowed", None),
            ("POST", "/routes/x", None, None, 405, "Method Not Allowed", None),
        ]  # fmt: skip
        for case in cases:
            self.assertRefused(*case)
        self.assertEqual(len(self.routes), 0)

    def test_a_long_value_is_cut_in_the_detail(self) -> None:
        pattern = "/" + "a" * 5000 + "{"
        _, _, answer = self.call("POST", "/routes", {"method": "GET", "url_pattern": pattern})
        self.assertEqual(answer["detail"], "unbalanced braces in url_pattern '/" + "a" * 79 + "'...")
        tokens = "/nonexistent/" + "t" * 1000
        body = {"method": "GET", "url_pattern": "/a", "auth": {"bearer_tokens_file": tokens}}
        _, _, answer = self.call("POST", "/routes", body)
        self.assertEqual(answer["detail"], f"auth: cannot read {tokens}"[:297] + "...")

    def test_a_refusal_logs_nothing_and_a_change_one_line(self) -> None:
        events: list[dict[str, Any]] = []
        self.patch(control_api.log, "observer", events.append)
        self.call("POST", "/routes", {"method": "GET", "url_pattern": "/{a"})
        self.call("PUT", "/routes", {"method": "GET", "url_pattern": "/a", "index": -1})
        self.call("POST", "/routes", raw=b"{")
        self.assertEqual(events, [])
        added = self.call("POST", "/routes", {"method": "GET", "url_pattern": "/a", "limits": {"cpu": 2}})[2]
        inserted = self.call("PUT", "/routes", {"method": "POST", "url_pattern": "/b", "index": 0})[2]
        self.call("DELETE", "/routes/" + added["id"])
        lines = [formatEvent(event) for event in events]
        self.assertEqual(
            [line.partition(": ")[0] for line in lines], ["route added", "route inserted", "route removed"]
        )
        self.assertEqual(json.loads(lines[0].partition(": ")[2]), {**added, "index": 0})
        self.assertEqual(json.loads(lines[1].partition(": ")[2]), inserted)
        self.assertEqual(lines[2], "route removed: " + added["id"])

    def test_a_path_that_is_not_utf8_is_a_json_404(self) -> None:
        for path in ("/routes/%ff%fe", "/%c3%28", "/handlers/%80"):
            self.assertRefused(
                "GET",
                path,
                None,
                None,
                404,
                "Not Found",
                "the path or host is not UTF-8 once percent-decoded",
            )

    def test_success_keeps_the_standard_phrase(self) -> None:
        self.call("POST", "/routes", {"method": "GET", "url_pattern": "/a"})
        self.assertEqual(self.phrase, b"Created")
        self.call("GET", "/routes")
        self.assertEqual(self.phrase, b"OK")

    def test_handler_options(self) -> None:
        options = {"stdin": "body", "buffer": True, "error_status": 500}
        code, _, route = self.call("POST", "/routes", {"method": "POST", "url_pattern": "/a", **options})
        self.assertEqual((code, {key: route[key] for key in options}), (201, options))
        self.assertEqual({key: self.call("GET", "/routes")[2][0][key] for key in options}, options)
        for bad, detail in (
            ({"stdin": "file"}, "stdin must be \"body\", not 'file'"),
            ({"buffer": "yes"}, "buffer must be true or false, not 'yes'"),
            ({"error_status": 302}, "error_status must be an integer from 400 to 599, not 302"),
        ):
            body = {"method": "GET", "url_pattern": "/b", **bad}
            self.assertRefused("PUT", "/routes", body, None, 422, "Invalid Route", detail)
        self.assertEqual(len(self.routes), 1)

    def test_health(self) -> None:
        self.call("POST", "/routes", {"method": "GET", "url_pattern": "/a"})
        self.assertEqual(self.call("GET", "/health")[2], {"status": "ok", "routes": 1})

    def test_queue_and_limit_fields(self) -> None:
        code, _, route = self.call(
            "POST",
            "/routes",
            {
                "method": "GET", "url_pattern": "/q", "max_concurrency": 1, "queue": 5, "queue_timeout": 2.5,
                "limits": {"processes": 10, "memory": 268435456},
            },
        )  # fmt: skip
        self.assertEqual(code, 201)
        self.assertEqual(
            (route["queue"], route["queue_timeout"], route["limits"]),
            (5, 2.5, {"memory": 268435456, "processes": 10}),
        )
        self.assertEqual(self.call("GET", "/routes/" + route["id"])[2], route)

    def test_bad_queues_and_limits_are_invalid_routes(self) -> None:
        queue = "queue must be an integer from 0 to 1000000, not "
        queue_timeout = "queue_timeout must be a finite number of seconds > 0, not "
        limit = "must be a whole number from 1 to 4611686018427387904, not "
        for bad, detail in (
            ({"queue": -1}, queue + "-1"), ({"queue": 1.5}, queue + "1.5"), ({"queue": "5"}, queue + "'5'"),
            ({"queue": True}, queue + "true"), ({"queue": 10**7}, queue + "10000000"),
            ({"queue_timeout": 0}, queue_timeout + "0"), ({"queue_timeout": -1}, queue_timeout + "-1"),
            ({"queue_timeout": "1"}, "queue_timeout must be a number of seconds, not '1'"),
            ({"queue_timeout": 1e400}, queue_timeout + "inf"),
            ({"limits": {"memory": "lots"}}, f"limit memory {limit}'lots'"),
            ({"limits": {"bogus": 1}}, "unknown limit 'bogus' (known: memory, cpu, open_files, file_size, processes)"),
            ({"limits": {"cpu": 1.5}}, f"limit cpu {limit}1.5"), ({"limits": {"cpu": 0}}, f"limit cpu {limit}0"),
            ({"limits": {"open_files": -5}}, f"limit open_files {limit}-5"),
            ({"limits": {"memory": 2**63}}, f"limit memory {limit}9223372036854775808"),
            ({"limits": {"memory": True}}, f"limit memory {limit}true"),
            ({"limits": "256M"}, "limits must be a JSON object, not '256M'"),
            ({"limits": [1]}, "limits must be a JSON object, not a list"),
            ({"limits": {"memory": None}}, f"limit memory {limit}null"),
        ):  # fmt: skip
            body = {"method": "GET", "url_pattern": "/b", **bad}
            self.assertRefused("POST", "/routes", body, None, 422, "Invalid Route", detail)
        self.assertEqual(self.call("GET", "/routes")[2], [])

    def test_the_other_route_fields_say_what_is_wrong(self) -> None:
        for bad, detail in (
            ({"timeout": "5"}, "timeout must be a number of seconds, not '5'"),
            ({"timeout": -1}, "timeout must be a finite number of seconds > 0, not -1"),
            ({"max_concurrency": 0}, "max_concurrency must be an integer >= 1, not 0"),
            ({"keep_running_on_disconnect": 1}, "keep_running_on_disconnect must be true or false, not 1"),
            ({"auth": {"bearer_tokens_file": "/nonexistent/tokens"}},
             "auth: cannot read /nonexistent/tokens: No such file or directory"),
            ({"auth": {"allow": ["10.0.0.0/33"]}},
             "auth: bad network '10.0.0.0/33': '10.0.0.0/33' does not appear to be an IPv4 or IPv6 network"),
            ({"auth": {"tokens": "x"}}, "auth: unknown auth keys: tokens"),
            ({"rate": {"requests": 0, "per": 1}}, "rate requests must be a whole number from 1 to 1000000"),
            ({"rate": {"requests": 1, "per": 1, "key": "ip"}}, 'rate key must be "client" or "route"'),
            ({"cors": {"origins": ["*"], "credentials": True}},
             'cors credentials cannot be true with origins ["*"]: list the origins'),
            ({"mode": "sse"}, "mode must be \"http\", \"websocket\" or \"events\", not 'sse'"),
            ({"mode": "websocket", "stdin": "body"}, "mode websocket takes no stdin"),
            ({"mode": "events", "ping": 5}, "ping needs mode websocket, not events"),
            ({"mode": "websocket", "origins": ["nope"]},
             "origin 'nope' is not '*' or an http, https, ws or wss URL of a host "
             "(scheme://host[:port], no path, query or fragment)"),
            ({"job": "yes"}, "job must be true or false, not 'yes'"),
        ):  # fmt: skip
            body = {"method": "GET", "url_pattern": "/b", **bad}
            self.assertRefused("POST", "/routes", body, None, 422, "Invalid Route", detail)
        self.assertEqual(self.call("GET", "/routes")[2], [])

    def test_an_invalid_history_query_names_what_is_wrong(self) -> None:
        limit = "limit must be a whole number from 1 to 10000, not "
        since = "since must be an RFC 3339 time with a zone (2026-12-07T10:00:00Z), not "
        for query, detail in (
            ("limit=abc", limit + "'abc'"), ("limit=0", limit + "'0'"), ("limit=" + "9" * 90, limit + f"'{'9' * 80}'..."),
            ("outcome=failed", "outcome must be one of ok, error, signal, timeout, disconnect, killed, not 'failed'"),
            ("since=yesterday", since + "'yesterday'"),
            ("since=2026-03-01T10:00:00", since + "'2026-03-01T10:00:00'"),
        ):  # fmt: skip
            code, _, answer = self.call("GET", "/history?" + query)
            self.assertEqual((code, answer["reason"], self.phrase), (400, "Invalid Query", b"Invalid Query"))
            self.assertEqual(answer["detail"], detail, query)


class BodyLimitTests(SynchronousTestCase):
    def test_a_body_over_the_limit_is_refused_with_the_limit(self) -> None:
        resource = ControlAPI(routes=RouteTable()).resource()
        site = Site(resource, requestFactory=bounded_request_factory(100), reactor=MemoryReactorClock())
        transport = StringTransport()
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"POST /routes HTTP/1.1\r\nHost: c\r\nContent-Length: 101\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertEqual(head.split(b"\r\n")[0], b"HTTP/1.1 413 Request Entity Too Large")
        self.assertEqual(
            json.loads(body), {"reason": "Request Entity Too Large", "detail": "the body is over 100 bytes"}
        )
        self.assertTrue(transport.disconnecting)


class FakeHandlers:
    """Live handlers as the user interface (or the workers) would show them."""

    def __init__(self) -> None:
        self.shown = {"h1": {"id": "h1", "state": "running", "pid": 42}}
        self.killed: list[str] = []

    def listing(self) -> Any:
        return succeed(list(self.shown.values()))

    def handler_info(self, handler_id: str) -> Any:
        return self.shown.get(handler_id)

    def kill(self, handler_id: str) -> Any:
        self.killed.append(handler_id)
        return succeed(self.shown.pop(handler_id, None) is not None)


class HandlersTests(SynchronousTestCase):
    call = ControlAPITests.call

    def setUp(self) -> None:
        self.routes = RouteTable()
        self.handlers = FakeHandlers()
        self.api = ControlAPI(routes=self.routes, handlers=self.handlers)
        self.treq = StubTreq(self.api.resource())

    def test_list_get_kill(self) -> None:
        self.assertEqual(
            self.call("GET", "/handlers"), (200, "application/json", [self.handlers.shown["h1"]])
        )
        self.assertEqual(self.call("GET", "/handlers/h1")[:2], (200, "application/json"))
        self.assertEqual(self.call("DELETE", "/handlers/h1"), (204, "", None))
        self.assertEqual(self.handlers.killed, ["h1"])
        for method in ("GET", "DELETE"):
            self.assertEqual(
                self.call(method, "/handlers/h1"), (404, "application/json", {"reason": "Handler Not Found"})
            )
        self.assertEqual(self.call("GET", "/handlers")[2], [])

    def test_without_handlers_there_are_none(self) -> None:
        api = StubTreq(ControlAPI(routes=self.routes).resource())
        response = self.successResultOf(api.get(URL + "/handlers"))
        self.assertEqual(self.successResultOf(response.json()), [])
        self.assertEqual(self.successResultOf(api.delete(URL + "/handlers/x")).code, 404)
