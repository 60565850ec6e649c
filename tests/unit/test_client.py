"""kapow.client.ControlClient in memory: every call through StubTreq over the real control API,
or over a stand-in for its run history."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from hyperlink import EncodedURL
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from kapow.client import ControlClient, ControlError, CredentialsError
from kapow.control.api import ControlAPI
from kapow.core import credentials
from kapow.core.routes import RouteTable
from kapow.core.runs import InvalidQuery, RunRecord, parse_query, parse_time

URL = "https://control.test:8081"


class FakeHandlers:
    """Two live handlers, as the user interface would show them."""

    def __init__(self) -> None:
        self.live = {
            f"h{n}": {
                "id": f"h{n}",
                "route_id": "r",
                "method": "GET",
                "path": f"/{n}",
                "remote": "127.0.0.1",
                "pid": 100 + n,
                "started": "2026-01-01T00:00:00Z",
                "state": "running",
            }
            for n in (1, 2)
        }

    def listing(self) -> list[dict[str, Any]]:
        return list(self.live.values())

    def handler_info(self, handler_id: str) -> dict[str, Any] | None:
        return self.live.get(handler_id)

    def kill(self, handler_id: str) -> bool:
        return self.live.pop(handler_id, None) is not None


class Recorder(Resource):
    """Answers every request with ``code`` and ``body``, and keeps what each one asked."""

    isLeaf = True

    def __init__(self, code: int = 200, body: bytes = b"[]") -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.seen: list[tuple[bytes, bytes, bytes | None, bytes]] = []

    def render(self, request: IRequest) -> bytes:
        self.seen.append((request.method, request.uri, request.getHeader(b"host"), request.content.read()))
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        return self.body


class _Case(SynchronousTestCase):
    def refusal(self, d: Deferred[Any]) -> ControlError:
        return self.failureResultOf(d, ControlError).value


class RouteTests(_Case):
    def setUp(self) -> None:
        ids = iter(f"id-{n}" for n in range(100))
        self.routes = RouteTable()
        api = ControlAPI(routes=self.routes, new_id=lambda: next(ids))
        self.client = ControlClient(URL, StubTreq(api.resource()))

    def test_add_list_get_remove(self) -> None:
        added = self.successResultOf(self.client.add_route("/a", "echo a"))
        self.assertEqual(
            added,
            {
                "id": "id-0",
                "method": "GET",
                "url_pattern": "/a",
                "entrypoint": "/bin/sh -c",
                "command": "echo a",
                "index": 0,
            },
        )
        self.successResultOf(self.client.add_route("/b", method="POST", entrypoint="/usr/bin/env"))
        listing = self.successResultOf(self.client.list_routes())
        self.assertEqual(
            [(r["id"], r["index"], r["method"], r["entrypoint"], r["command"]) for r in listing],
            [("id-0", 0, "GET", "/bin/sh -c", "echo a"), ("id-1", 1, "POST", "/usr/bin/env", "")],
        )
        self.assertEqual(self.successResultOf(self.client.get_route("id-1"))["url_pattern"], "/b")
        self.assertIsNone(self.successResultOf(self.client.remove_route("id-0")))
        self.assertEqual(len(self.routes), 1)
        self.assertEqual(self.successResultOf(self.client.get_route("id-1"))["index"], 0)

    def test_index_inserts(self) -> None:
        for pattern in ("/0", "/1", "/2"):
            self.successResultOf(self.client.add_route(pattern))
        self.assertEqual(self.successResultOf(self.client.add_route("/x", index=1))["index"], 1)
        self.assertEqual(self.successResultOf(self.client.add_route("/first", index=0))["index"], 0)
        self.assertEqual(self.successResultOf(self.client.add_route("/late", index=99))["index"], 5)
        listing = self.successResultOf(self.client.list_routes())
        self.assertEqual([r["url_pattern"] for r in listing], ["/first", "/0", "/x", "/1", "/2", "/late"])

    def test_fields_are_route_fields(self) -> None:
        added = self.successResultOf(
            self.client.add_route("/f", "cat", stdin="body", buffer=True, error_status=502)
        )
        self.assertEqual((added["stdin"], added["buffer"], added["error_status"]), ("body", True, 502))
        self.assertEqual(self.successResultOf(self.client.get_route(added["id"]))["buffer"], True)

    def test_route_not_found(self) -> None:
        for d in (self.client.get_route("nope"), self.client.remove_route("nope")):
            e = self.refusal(d)
            self.assertEqual((e.status, e.reason, e.detail), (404, "Route Not Found", None))
            self.assertEqual(str(e), "Route Not Found")

    def test_invalid_route(self) -> None:
        for d, detail in (
            (self.client.add_route("no-slash"), "url_pattern 'no-slash' does not start with '/'"),
            (self.client.add_route("/{a"), "unbalanced braces in url_pattern '/{a'"),
            (self.client.add_route("/a", method=""), "method is empty"),
            (self.client.add_route("/a", buffer="yes"), "buffer must be true or false, not 'yes'"),
            (self.client.add_route("/a", index=-1), "index must be a whole number >= 0, not -1"),
        ):
            e = self.refusal(d)
            self.assertEqual(
                (e.status, e.reason, e.detail, str(e)),
                (422, "Invalid Route", detail, f"Invalid Route: {detail}"),
            )
        self.assertEqual(len(self.routes), 0)

    def test_malformed_json(self) -> None:
        """A body cut short on its way: the server's 400 is a ControlError saying where."""
        api_resource = ControlAPI(routes=self.routes).resource()
        client = ControlClient(URL, _CutShort(StubTreq(api_resource)))
        e = self.refusal(client.add_route("/a"))
        detail = "invalid JSON at line 1, column 38 (char 37): expecting ',' delimiter"
        self.assertEqual(
            (e.status, e.reason, e.detail, str(e)),
            (400, "Malformed JSON", detail, f"Malformed JSON: {detail}"),
        )


class _CutShort:
    """Sends every JSON body without its last byte."""

    def __init__(self, stub: StubTreq) -> None:
        self._stub = stub

    def request(self, method: str, url: EncodedURL, **kwargs: Any) -> Deferred[Any]:
        data = json.dumps(kwargs.pop("json")).encode()[:-1]
        return self._stub.request(method, url, data=data, **kwargs)


class HandlerTests(_Case):
    def setUp(self) -> None:
        self.handlers = FakeHandlers()
        api = ControlAPI(routes=RouteTable(), handlers=self.handlers)
        self.client = ControlClient(URL, StubTreq(api.resource()))

    def test_list_get_kill(self) -> None:
        listing = self.successResultOf(self.client.list_handlers())
        self.assertEqual([h["id"] for h in listing], ["h1", "h2"])
        self.assertEqual(listing[0], self.handlers.live["h1"])
        self.assertEqual(self.successResultOf(self.client.get_handler("h2"))["pid"], 102)
        self.assertIsNone(self.successResultOf(self.client.kill_handler("h1")))
        self.assertEqual(list(self.handlers.live), ["h2"])
        self.assertEqual([h["id"] for h in self.successResultOf(self.client.list_handlers())], ["h2"])

    def test_handler_not_found(self) -> None:
        for d in (self.client.get_handler("h1x"), self.client.kill_handler("gone")):
            e = self.refusal(d)
            self.assertEqual((e.status, e.reason, str(e)), (404, "Handler Not Found", "Handler Not Found"))
        self.assertEqual(len(self.handlers.live), 2)


class HistoryTests(_Case):
    """Run history: the paths and queries SPEC §12 names."""

    def setUp(self) -> None:
        self.server = Recorder(body=b'[{"id": "run-1"}]')
        self.client = ControlClient(URL, StubTreq(self.server))

    def asked(self) -> tuple[bytes, str, list[tuple[str, str]]]:
        method, uri, _, _ = self.server.seen[-1]
        parts = urlsplit(uri.decode("ascii"))
        return method, parts.path, parse_qsl(parts.query, keep_blank_values=True)

    def test_history_without_filters(self) -> None:
        self.assertEqual(self.successResultOf(self.client.history()), [{"id": "run-1"}])
        self.assertEqual(self.server.seen[-1][1], b"/history")
        self.assertEqual(self.asked(), (b"GET", "/history", []))

    def test_history_filters(self) -> None:
        since = datetime.datetime(2026, 3, 1, 12, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
        self.successResultOf(self.client.history(route_id="r 1/&x", outcome="killed", since=since, limit=5))
        self.assertEqual(
            self.asked(),
            (
                b"GET",
                "/history",
                [
                    ("route_id", "r 1/&x"),
                    ("outcome", "killed"),
                    ("since", "2026-03-01T10:30:00Z"),
                    ("limit", "5"),
                ],
            ),
        )
        self.successResultOf(self.client.history(since="2026-03-01T10:30:00.5+01:00"))
        self.assertEqual(self.asked()[2], [("since", "2026-03-01T10:30:00.5+01:00")])

    def test_since_in_epoch_seconds(self) -> None:
        when = datetime.datetime(2026, 3, 1, 10, 30, tzinfo=datetime.UTC)
        self.successResultOf(self.client.history(since=when.timestamp()))
        self.assertEqual(self.asked()[2], [("since", "2026-03-01T10:30:00Z")])
        self.successResultOf(self.client.history(since=int(when.timestamp()) + 1))
        self.assertEqual(self.asked()[2], [("since", "2026-03-01T10:30:01Z")])
        self.successResultOf(self.client.history(since=when.timestamp() + 0.25))
        self.assertEqual(self.asked()[2], [("since", "2026-03-01T10:30:00.250000Z")])
        self.successResultOf(self.client.history(since=0))
        self.assertEqual(self.asked()[2], [("since", "1970-01-01T00:00:00Z")])

    def test_naive_since_is_refused_before_asking(self) -> None:
        d = self.client.history(since=datetime.datetime(2026, 3, 1))
        self.assertIn("time zone", str(self.failureResultOf(d, ValueError).value))
        self.assertEqual(self.server.seen, [])

    def test_since_that_is_no_time_is_refused_before_asking(self) -> None:
        for since in (float("nan"), float("inf"), 1e20, True, b"2026-03-01T10:30:00Z"):
            d = self.client.history(since=since)  # type: ignore[arg-type]
            self.assertIn("since=", str(self.failureResultOf(d, ValueError).value), since)
        self.assertEqual(self.server.seen, [])

    def test_run(self) -> None:
        self.server.body = b'{"id": "a/b c", "outcome": "ok"}'
        self.assertEqual(self.successResultOf(self.client.run("a/b c")), {"id": "a/b c", "outcome": "ok"})
        self.assertEqual(self.server.seen[-1][:2], (b"GET", b"/history/a%2Fb%20c"))

    def test_refusals(self) -> None:
        self.server.code, self.server.body = 404, b'{"reason": "Run Not Found"}'
        e = self.refusal(self.client.run("nope"))
        self.assertEqual((e.status, e.reason), (404, "Run Not Found"))
        self.server.code, self.server.body = 400, b'{"reason": "Invalid Query"}'
        e = self.refusal(self.client.history(limit=-1))
        self.assertEqual((e.status, e.reason), (400, "Invalid Query"))


def _record(n: int, route_id: str, outcome: str) -> RunRecord:
    return {
        "id": f"run-{n}",
        "route_id": route_id,
        "pattern": "/p",
        "method": "GET",
        "path": f"/p/{n}",
        "remote": "127.0.0.1",
        "started": f"2026-03-01T10:{n:02d}:00.000Z",
        "duration_s": 0.5,
        "status": 200 if outcome == "ok" else None,
        "outcome": outcome,
        "exit_status": 0 if outcome == "ok" else None,
        "signal": None,
        "bytes_in": 0,
        "bytes_out": 3,
        "mode": "http",
        "job": False,
    }


class HistoryServer:
    """
    A stand-in for the control API's history (SPEC §12): ``GET /history``
    finds the records its query names, newest first, ``GET /history/{id}``
    one of them; 400 ``Invalid Query``, 404 ``Run Not Found``.
    """

    app = Klein()

    def __init__(self, records: list[RunRecord]) -> None:
        self.records = records

    def _refuse(self, request: IRequest, code: int, reason: str) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"reason": reason}).encode()

    @app.route("/history", methods=["GET"])
    def history(self, request: IRequest) -> bytes:
        args = {name.decode(): [v.decode() for v in values] for name, values in request.args.items()}
        try:
            query = parse_query(args)
        except InvalidQuery:
            return self._refuse(request, 400, "Invalid Query")
        found = [
            record
            for record in sorted(self.records, key=lambda r: parse_time(r["started"]), reverse=True)
            if query.route_id in (None, record["route_id"])
            and query.outcome in (None, record["outcome"])
            and (query.since is None or parse_time(record["started"]) >= query.since)
        ]
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(found[: query.limit]).encode()

    @app.route("/history/<path:run_id>", methods=["GET"])
    def run(self, request: IRequest, run_id: str) -> bytes:
        for record in self.records:
            if record["id"] == run_id:
                request.setHeader(b"content-type", b"application/json")
                return json.dumps(record).encode()
        return self._refuse(request, 404, "Run Not Found")


class HistoryServerTests(_Case):
    """The history calls against a server that reads their queries as the control API does."""

    def setUp(self) -> None:
        outcomes = ["ok", "error", "ok", "killed", "error", "ok"]
        self.records = [_record(n, "r1" if n % 2 else "r 2/x", outcome) for n, outcome in enumerate(outcomes)]
        self.records.append({**_record(9, "r1", "ok"), "id": "job 1/a", "job": True, "stderr_tail": "oops\n"})
        self.server = HistoryServer(self.records)
        self.client = ControlClient(URL, StubTreq(self.server.app.resource()))

    def ids(self, d: Deferred[list[dict[str, Any]]]) -> list[str]:
        return [record["id"] for record in self.successResultOf(d)]

    def test_everything_newest_first(self) -> None:
        self.assertEqual(
            self.ids(self.client.history()), ["job 1/a", "run-5", "run-4", "run-3", "run-2", "run-1", "run-0"]
        )
        self.assertEqual(self.successResultOf(self.client.history(limit=1)), [self.records[-1]])

    def test_filters(self) -> None:
        self.assertEqual(self.ids(self.client.history(route_id="r 2/x")), ["run-4", "run-2", "run-0"])
        self.assertEqual(self.ids(self.client.history(outcome="error")), ["run-4", "run-1"])
        self.assertEqual(self.ids(self.client.history(route_id="r1", outcome="ok", limit=1)), ["job 1/a"])
        self.assertEqual(self.ids(self.client.history(route_id="nope")), [])

    def test_since_in_each_form_finds_the_same(self) -> None:
        moment = datetime.datetime(2026, 3, 1, 11, 4, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
        for since in (moment, moment.timestamp(), "2026-03-01T10:04:00Z", "2026-03-01T11:04:00+01:00"):
            self.assertEqual(self.ids(self.client.history(since=since)), ["job 1/a", "run-5", "run-4"], since)

    def test_one_run(self) -> None:
        self.assertEqual(self.successResultOf(self.client.run("run-3")), self.records[3])
        job = self.successResultOf(self.client.run("job 1/a"))
        self.assertEqual((job["job"], job["stderr_tail"]), (True, "oops\n"))

    def test_run_not_found(self) -> None:
        for run_id in ("run-7", "run-1/x", "job 1"):
            e = self.refusal(self.client.run(run_id))
            self.assertEqual((e.status, e.reason, str(e)), (404, "Run Not Found", "Run Not Found"))

    def test_invalid_query(self) -> None:
        for d in (
            self.client.history(limit=0),
            self.client.history(limit=10_001),
            self.client.history(outcome="failed"),
            self.client.history(since="yesterday"),
            self.client.history(since="2026-03-01T10:00:00"),
        ):
            e = self.refusal(d)
            self.assertEqual((e.status, e.reason, str(e)), (400, "Invalid Query", "Invalid Query"))


class AnswerTests(_Case):
    """What the client makes of answers and URLs, on a recording server."""

    def client(self, url: str = URL, code: int = 200, body: bytes = b"[]") -> ControlClient:
        self.server = Recorder(code, body)
        return ControlClient(url, StubTreq(self.server))

    def test_detail(self) -> None:
        body = b'{"reason": "Invalid Route", "detail": "unbalanced braces in url_pattern \'/bad/{\'"}'
        e = self.refusal(self.client(code=422, body=body).add_route("/bad/{"))
        self.assertEqual(
            (e.status, e.reason, e.detail),
            (422, "Invalid Route", "unbalanced braces in url_pattern '/bad/{'"),
        )
        # what the command line prints after "kapow: "
        self.assertEqual(str(e), "Invalid Route: unbalanced braces in url_pattern '/bad/{'")

    def test_an_answer_without_a_detail(self) -> None:
        for body in (b'{"reason": "Route Not Found"}', b'{"reason": "Route Not Found", "detail": ""}'):
            e = self.refusal(self.client(code=404, body=body).get_route("x"))
            self.assertEqual((e.reason, e.detail, str(e)), ("Route Not Found", None, "Route Not Found"))

    def test_an_answer_without_a_reason(self) -> None:
        for body in (b"<html>Bad Gateway</html>", b"", b"[1]", b'{"reason": ""}'):
            e = self.refusal(self.client(code=502, body=body).list_routes())
            self.assertEqual((e.status, e.reason, e.detail, str(e)), (502, None, None, "HTTP 502"))
        # a detail without a reason does not stand for one
        e = self.refusal(self.client(code=502, body=b'{"detail": "upstream down"}').list_routes())
        self.assertEqual((e.reason, e.detail, str(e)), (None, "upstream down", "HTTP 502"))

    def test_other_success_codes(self) -> None:
        self.assertIsNone(self.successResultOf(self.client(code=204, body=b"").remove_route("x")))
        self.assertEqual(
            self.successResultOf(self.client(code=201, body=b'{"id": "x"}').get_route("x")), {"id": "x"}
        )

    def test_redirects_are_not_followed(self) -> None:
        client = self.client(code=302, body=b"")
        e = self.refusal(client.list_routes())
        self.assertEqual((e.status, str(e)), (302, "HTTP 302"))
        self.assertEqual(len(self.server.seen), 1)

    def test_requests(self) -> None:
        client = self.client(body=b"{}")
        self.successResultOf(
            client.add_route("/p/{x}", "echo", method="PUT", entrypoint="/bin/bash -c", auth={})
        )
        self.successResultOf(client.add_route("/q", index=2))
        self.successResultOf(client.kill_handler("h/1?"))
        self.successResultOf(client.get_handler("h 2"))
        sent = [
            (method, uri, json.loads(body) if body else None) for method, uri, _, body in self.server.seen
        ]
        self.assertEqual(
            sent,
            [
                (
                    b"POST",
                    b"/routes",
                    {
                        "method": "PUT",
                        "url_pattern": "/p/{x}",
                        "entrypoint": "/bin/bash -c",
                        "command": "echo",
                        "auth": {},
                    },
                ),
                (b"PUT", b"/routes", {"method": "GET", "url_pattern": "/q", "index": 2}),
                (b"DELETE", b"/handlers/h%2F1%3F", None),
                (b"GET", b"/handlers/h%202", None),
            ],
        )

    def test_ipv6_literal(self) -> None:
        client = self.client("https://[::1]:8081")
        self.assertEqual(self.successResultOf(client.list_routes()), [])
        self.assertEqual(self.server.seen[-1][:3], (b"GET", b"/routes", b"[::1]:8081"))
        self.successResultOf(client.history(outcome="ok"))
        self.assertEqual(self.server.seen[-1][:3], (b"GET", b"/history?outcome=ok", b"[::1]:8081"))

    def test_path_prefix(self) -> None:
        root = Resource()
        root.putChild(b"kapow", ControlAPI(routes=RouteTable()).resource())
        client = ControlClient("https://control.test/kapow/", StubTreq(root))
        self.assertEqual(self.successResultOf(client.add_route("/a"))["url_pattern"], "/a")
        self.assertEqual(len(self.successResultOf(client.list_routes())), 1)

    def test_bad_urls(self) -> None:
        for url in ("http://localhost:8081", "localhost:8081", "https://", "", "https://[::1"):
            with self.assertRaises(ValueError, msg=url) as caught:
                self.client(url)
            self.assertIn("HTTPS only", str(caught.exception))


class ConstructorTests(SynchronousTestCase):
    """from_environ and from_directory read what kapow server gives its clients."""

    def setUp(self) -> None:
        self.creds = credentials.generate_control_credentials("localhost:8081")
        self.reactor = MemoryReactorClock()

    def test_from_environ(self) -> None:
        env = credentials.credentials_environ(self.creds)
        self.assertEqual(ControlClient.from_environ(self.reactor, env).url, "https://localhost:8081")
        for url in ("", "https://[::1]:9"):
            client = ControlClient.from_environ(self.reactor, {**env, "KAPOW_CONTROL_URL": url})
            self.assertEqual(client.url, url or "https://localhost:8081")
        with self.assertRaises(ValueError):
            ControlClient.from_environ(self.reactor, {**env, "KAPOW_CONTROL_URL": "http://localhost:8081"})

    def test_from_environ_names_what_is_missing(self) -> None:
        env = credentials.credentials_environ(self.creds)
        del env["KAPOW_CONTROL_CLIENT_KEY"]
        with self.assertRaises(CredentialsError) as caught:
            ControlClient.from_environ(self.reactor, env)
        self.assertIn("KAPOW_CONTROL_CLIENT_KEY", str(caught.exception))

    def test_from_environ_reads_os_environ(self) -> None:
        saved = dict(os.environ)
        self.addCleanup(lambda: (os.environ.clear(), os.environ.update(saved)))
        os.environ.update(credentials.credentials_environ(self.creds))
        os.environ["KAPOW_CONTROL_URL"] = "https://127.0.0.1:9999"
        self.assertEqual(ControlClient.from_environ(self.reactor).url, "https://127.0.0.1:9999")

    def test_from_directory(self) -> None:
        directory = os.path.join(tempfile.mkdtemp(prefix="kapow-test-client-"), "control")
        self.addCleanup(shutil.rmtree, os.path.dirname(directory))
        credentials.write_client_credentials(self.creds, directory)
        client = ControlClient.from_directory(self.reactor, "https://localhost:1234", directory)
        self.assertEqual(repr(client), "ControlClient('https://localhost:1234')")
        os.unlink(os.path.join(directory, "client.key"))
        with self.assertRaises(CredentialsError) as caught:
            ControlClient.from_directory(self.reactor, "https://localhost:1234", directory)
        self.assertIn("client.key", str(caught.exception))

    def test_from_directory_reads_the_recorded_url(self) -> None:
        """Without a URL, the one the directory records, else the default."""
        directory = os.path.join(tempfile.mkdtemp(prefix="kapow-test-client-"), "control")
        self.addCleanup(shutil.rmtree, os.path.dirname(directory))
        credentials.write_client_credentials(self.creds, directory)
        self.assertEqual(
            ControlClient.from_directory(self.reactor, None, directory).url, "https://localhost:8081"
        )
        credentials.write_client_credentials(self.creds, directory, "https://[::1]:4321")
        self.assertEqual(
            ControlClient.from_directory(self.reactor, None, directory).url, "https://[::1]:4321"
        )
        given = ControlClient.from_directory(self.reactor, "https://127.0.0.1:9", directory)
        self.assertEqual(given.url, "https://127.0.0.1:9")
