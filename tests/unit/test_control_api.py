"""The control API in memory (StubTreq): every call, every error shape."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from kapow.control.api import ControlAPI
from kapow.core.routes import RouteTable

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

    def test_errors(self) -> None:
        cases = [
            ("POST", "/routes", None, b"{", (400, "Malformed JSON")),
            ("POST", "/routes", None, b"\xff\xfe", (400, "Malformed JSON")),
            ("PUT", "/routes", None, b"[1,", (400, "Malformed JSON")),
            ("POST", "/routes", {"url_pattern": "/a"}, None, (422, "Invalid Route")),
            ("POST", "/routes", {"method": "GET", "url_pattern": "a"}, None, (422, "Invalid Route")),
            ("POST", "/routes", {"method": "GET", "url_pattern": "/{a"}, None, (422, "Invalid Route")),
            ("POST", "/routes", {"method": "GET", "url_pattern": "/{a:(}"}, None, (422, "Invalid Route")),
            ("POST", "/routes", {"method": 1, "url_pattern": "/a"}, None, (422, "Invalid Route")),
            (
                "POST",
                "/routes",
                {"method": "GET", "url_pattern": "/a", "command": 3},
                None,
                (422, "Invalid Route"),
            ),
            ("POST", "/routes", [], None, (422, "Invalid Route")),
            (
                "PUT",
                "/routes",
                {"method": "GET", "url_pattern": "/a", "index": -1},
                None,
                (422, "Invalid Route"),
            ),
            (
                "PUT",
                "/routes",
                {"method": "GET", "url_pattern": "/a", "index": "1"},
                None,
                (422, "Invalid Route"),
            ),
            (
                "PUT",
                "/routes",
                {"method": "GET", "url_pattern": "/a", "index": 1.5},
                None,
                (422, "Invalid Route"),
            ),
            (
                "PUT",
                "/routes",
                {"method": "GET", "url_pattern": "/a", "index": True},
                None,
                (422, "Invalid Route"),
            ),
            ("GET", "/routes/nope", None, None, (404, "Route Not Found")),
            ("DELETE", "/routes/nope", None, None, (404, "Route Not Found")),
            ("GET", "/elsewhere", None, None, (404, "Not Found")),
            ("PATCH", "/routes", None, None, (405, "Method Not Allowed")),
            ("POST", "/routes/x", None, None, (405, "Method Not Allowed")),
        ]
        for method, path, body, raw, (code, reason) in cases:
            got = self.call(method, path, body, raw)
            self.assertEqual(got, (code, "application/json", {"reason": reason}), (method, path, body, raw))
            self.assertEqual(self.phrase, reason.encode(), (method, path))
        self.assertEqual(len(self.routes), 0)

    def test_a_path_that_is_not_utf8_is_a_json_404(self) -> None:
        for path in ("/routes/%ff%fe", "/%c3%28", "/handlers/%80"):
            self.assertEqual(self.call("GET", path), (404, "application/json", {"reason": "Not Found"}))

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
        for bad in ({"stdin": "file"}, {"buffer": "yes"}, {"error_status": 302}):
            got = self.call("PUT", "/routes", {"method": "GET", "url_pattern": "/b", **bad})
            self.assertEqual(got, (422, "application/json", {"reason": "Invalid Route"}), bad)
            self.assertEqual(self.phrase, b"Invalid Route")
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
        for bad in (
            {"queue": -1}, {"queue": 1.5}, {"queue": "5"}, {"queue": True}, {"queue": 10**7},
            {"queue_timeout": 0}, {"queue_timeout": -1}, {"queue_timeout": "1"}, {"queue_timeout": 1e400},
            {"limits": {"memory": "lots"}}, {"limits": {"bogus": 1}}, {"limits": {"cpu": 1.5}},
            {"limits": {"cpu": 0}}, {"limits": {"open_files": -5}}, {"limits": {"memory": 2**63}},
            {"limits": {"memory": True}}, {"limits": "256M"}, {"limits": [1]}, {"limits": {"memory": None}},
        ):  # fmt: skip
            answer = self.call("POST", "/routes", {"method": "GET", "url_pattern": "/b", **bad})
            self.assertEqual(answer, (422, "application/json", {"reason": "Invalid Route"}), bad)
        self.assertEqual(self.call("GET", "/routes")[2], [])


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
