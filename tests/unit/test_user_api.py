"""
Tests for kapow.user: the user interface as a Klein app, in memory. Its
processes are started by a fake spawner that records each start and lets
the test end the process; everything else is real (route table, auth,
governor, admission, handlers, twisted.web's HTTP channel). And its
listener over HTTPS, answering plain HTTP, on an in-memory transport.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from kapow.core.routes import Match, Route, RouteTable
from kapow.handlers.admission import LocalAdmission, ServerQueue, Slots
from kapow.handlers.governor import Governor
from kapow.handlers.handler import HandlerRegistry
from kapow.handlers.spawn import ExitCallback, SpawnError
from kapow.user.api import UserAPI
from kapow.user.site import UserSite
from kapow.web.tls import PLAIN_HTTP_ANSWER, tls_server_endpoint, user_server_options
from tests.support.pki import make_pki
from tests.support.user_connection import PEER, SiteConnection, header_values, http_request

PLAIN = b"text/plain; charset=utf-8"


@dataclass
class Start:
    """One process start the user interface asked for."""

    handler_id: str
    argv: list[str]
    on_exit: ExitCallback
    stdin: int | None
    limits: Any
    stdin_content: bytes | None = None


@dataclass
class FakeSpawner:
    """
    Starts nothing: records each start and answers with ``result`` (a
    process group id by default); the test ends a process with :meth:`exit`.
    """

    debug: bool = False
    starts: list[Start] = field(default_factory=list)
    result: Deferred[int] | None = None

    def start(
        self,
        handler_id: str,
        argv: Any,
        on_exit: ExitCallback,
        stdin: int | None = None,
        limits: Any = None,
        stream: Any = None,
        stderr_tail: Any = None,
    ) -> Deferred[int]:
        content = None
        if stdin is not None:  # read now: the caller closes it once the result fired
            content = os.pread(stdin, 1 << 16, 0)
        self.starts.append(Start(handler_id, list(argv), on_exit, stdin, limits, content))
        if self.result is not None:
            return self.result
        return succeed(self.pgid(len(self.starts) - 1))

    @staticmethod
    def pgid(index: int) -> int:
        return 4000 + index

    def exit(self, index: int = -1, status: int | None = 0, sig: int | None = None) -> None:
        self.starts[index].on_exit(status, sig)


class UserTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.signals: list[tuple[int, int]] = []
        self.governor = Governor(
            self.reactor,
            group_alive=lambda pgid: False,
            signal_group=lambda pgid, sig: self.signals.append((pgid, sig)) is None,
        )
        self.routes = RouteTable()
        self.handlers = HandlerRegistry()
        self.spawner = FakeSpawner()
        self.api = UserAPI(
            routes=self.routes,
            handlers=self.handlers,
            spawner=self.spawner,
            governor=self.governor,
            admission=LocalAdmission(self.governor, Slots(self.reactor, ServerQueue())),
            reactor=self.reactor,
        )
        self.treq = StubTreq(self.api.resource())

    def route(self, pattern: str, method: str = "GET", **options: Any) -> Route:
        route = Route(id=f"route-{len(self.routes)}", method=method, url_pattern=pattern, **options)
        self.routes.append(route)
        return route

    def connect(self, raw: bytes) -> SiteConnection:
        """A client of the user interface's real site that has sent ``raw``."""
        return SiteConnection(UserSite(self.api.resource(), reactor=self.reactor), raw)

    def get(self, path: str, method: str = "GET", **kwargs: Any) -> Deferred[Any]:
        return self.treq.request(method, "http://user.example" + path, **kwargs)

    def answer(self, pending: Deferred[Any]) -> tuple[int, Any, bytes]:
        """The status, headers and body of a response that is complete."""
        self.treq.flush()
        response = self.successResultOf(pending)
        body = self.successResultOf(response.content())
        return response.code, response.headers, body

    def started_route(self, index: int = -1) -> tuple[str, dict[str, str]]:
        """The route id and matches of the handler of start ``index``."""
        handler = self.handlers.get(self.spawner.starts[index].handler_id)
        assert handler is not None
        return handler.route.id, handler.matches


class MatchingTests(UserTests):
    def test_no_route_is_404_in_plain_text(self) -> None:
        self.route("/x")
        code, headers, body = self.answer(self.get("/nope"))
        self.assertEqual((code, body), (404, b"Not Found\n"))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [PLAIN])
        self.assertEqual(self.spawner.starts, [])

    def test_another_method_is_405_naming_the_allowed_ones(self) -> None:
        self.route("/x")
        self.route("/{any}", method="PUT")
        code, headers, body = self.answer(self.get("/x", method="DELETE"))
        self.assertEqual((code, body), (405, b"Method Not Allowed\n"))
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, PUT"])
        self.assertEqual(self.spawner.starts, [])

    def test_an_answer_known_at_once_is_sent_with_its_length(self) -> None:
        connection = self.connect(http_request(target=b"/nope"))
        self.assertEqual(
            connection.transport.value().split(b"\r\n\r\n", 1)[1], b"Not Found\n"
        )  # not chunked: twisted.web knew the length
        _, headers, _ = connection.response()
        self.assertEqual(header_values(headers, b"content-length"), [b"10"])

    def test_paths_reach_the_route_table_as_sent(self) -> None:
        self.route("/x")
        self.route("//x")
        self.route("/x/")
        self.route("/{one}/{two}")
        self.route("/{any}", method="PUT")
        cases = [
            (b"GET", b"/x", "route-0", {}),
            (b"GET", b"//x", "route-1", {}),
            (b"GET", b"/x/", "route-2", {}),
            # the table matches the path percent-decoded, as it always has
            (b"GET", b"/a%2Fb", "route-3", {"one": "a", "two": "b"}),
            (b"PUT", b"/caf%C3%A9", "route-4", {"any": "caf\u00e9"}),
            # not UTF-8 once decoded: no error, the byte reaches the table
            (b"PUT", b"/%ff", "route-4", {"any": "\udcff"}),
        ]
        for method, target, route_id, matches in cases:
            connection = self.connect(http_request(method, target))
            self.assertEqual(self.started_route(), (route_id, matches), target)
            self.spawner.exit()
            self.assertEqual(connection.response()[0], 200, target)

    def test_a_host_that_is_not_utf8_is_no_error(self) -> None:
        self.route("/x")
        self.connect(http_request(target=b"/x", headers=[(b"Host", b"\xff.example")]))
        self.assertEqual(self.started_route(), ("route-0", {}))

    def test_routes_changed_at_runtime_are_served_at_once(self) -> None:
        self.assertEqual(self.answer(self.get("/late"))[0], 404)
        self.route("/late")
        self.get("/late")
        self.assertEqual(self.started_route(), ("route-0", {}))


class RefusalTests(UserTests):
    def test_an_address_outside_allow_is_403_and_starts_nothing(self) -> None:
        self.route("/x", auth={"allow": ["10.0.0.0/8"]})
        code, headers, body = self.answer(self.get("/x"))  # from 127.0.0.1
        self.assertEqual((code, body), (403, b"Forbidden\n"))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [PLAIN])
        self.assertEqual(self.spawner.starts, [])

    def test_a_missing_token_is_401_with_a_challenge_and_starts_nothing(self) -> None:
        tokens = Path(self.mktemp())
        tokens.write_text("sekrit\n")
        self.route("/x", auth={"bearer_tokens_file": str(tokens)})
        code, headers, body = self.answer(self.get("/x"))
        self.assertEqual((code, body), (401, b"Unauthorized\n"))
        self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b"Bearer"])
        self.assertEqual(self.spawner.starts, [])

        self.get("/x", headers={"Authorization": "Bearer sekrit"})
        self.assertEqual(self.started_route(), ("route-0", {}))

    def test_a_route_at_its_limit_is_503_with_retry_after(self) -> None:
        self.route("/x", max_concurrency=1)
        first = self.get("/x")
        code, headers, body = self.answer(self.get("/x"))
        self.assertEqual((code, body), (503, b"Service Unavailable\n"))
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(len(self.spawner.starts), 1)

        self.spawner.exit()
        self.assertEqual(self.answer(first)[0], 200)
        self.get("/x")  # the slot is free again
        self.assertEqual(len(self.spawner.starts), 2)

    def test_a_stopping_server_starts_nothing(self) -> None:
        self.route("/x")
        self.governor.stop_admitting()
        self.assertEqual(self.answer(self.get("/x"))[0], 503)
        self.assertEqual(self.spawner.starts, [])


class QueueTests(UserTests):
    def setUp(self) -> None:
        super().setUp()
        self.route("/q", max_concurrency=1, queue=2)
        self.first = self.get("/q")

    def queued(self) -> list[str]:
        return [shown["id"] for shown in self.api.listing() if shown["state"] == "queued"]

    def test_a_queued_request_starts_under_its_listed_id_when_a_slot_frees(self) -> None:
        second = self.get("/q")
        [queued] = self.queued()
        self.assertEqual(self.api.handler_info(queued)["pid"], None)
        self.assertEqual(len(self.spawner.starts), 1)

        self.spawner.exit()
        self.assertEqual(self.answer(self.first)[0], 200)
        self.assertEqual(self.spawner.starts[-1].handler_id, queued)
        self.assertEqual(self.api.handler_info(queued)["state"], "running")
        self.spawner.exit()
        self.assertEqual(self.answer(second)[0], 200)
        self.assertEqual(self.api.listing(), [])

    def test_a_full_queue_refuses_at_once(self) -> None:
        self.get("/q")
        self.get("/q")
        code, _, body = self.answer(self.get("/q"))
        self.assertEqual((code, body), (503, b"Service Unavailable\n"))

    def test_killing_a_queued_request_answers_503_and_starts_nothing(self) -> None:
        second = self.get("/q")
        [queued] = self.queued()
        self.assertTrue(self.api.kill(queued))
        code, headers, body = self.answer(second)
        self.assertEqual((code, body), (503, b"Service Unavailable\n"))
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(self.queued(), [])
        self.spawner.exit()
        self.assertEqual(len(self.spawner.starts), 1)

    def test_a_client_that_leaves_the_queue_gives_its_turn_away(self) -> None:
        leaving = self.connect(http_request(target=b"/q"))
        third = self.get("/q")
        leaving.lose()
        self.assertEqual(len(self.queued()), 1)
        self.spawner.exit()
        self.assertEqual(len(self.spawner.starts), 2)  # the third's, not the one that left
        self.spawner.exit()
        self.assertEqual(self.answer(third)[0], 200)
        self.assertEqual(leaving.transport.value(), b"")


class LifeTests(UserTests):
    def test_a_handler_runs_until_its_process_exits(self) -> None:
        self.route("/x", command="echo hi")
        pending = self.get("/x")
        [start] = self.spawner.starts
        self.assertEqual(start.argv, ["/bin/sh", "-c", "echo hi"])
        self.assertEqual((start.stdin, start.limits), (None, None))
        self.treq.flush()
        self.assertNoResult(pending)
        [shown] = self.api.listing()
        self.assertEqual(
            (shown["id"], shown["state"], shown["pid"], shown["path"]),
            (start.handler_id, "running", FakeSpawner.pgid(0), "/x"),
        )

        self.spawner.exit()
        code, _, body = self.answer(pending)
        self.assertEqual((code, body), (200, b""))
        self.assertEqual((len(self.handlers), self.governor.running(), self.api.listing()), (0, 0, []))

    def test_an_answer_without_a_body_has_no_content_type(self) -> None:
        self.route("/x")
        self.route("/typed")
        self.route("/nothing", method="HEAD")
        empty = self.connect(http_request(target=b"/x"))
        self.spawner.exit()
        typed = self.connect(http_request(target=b"/typed"))
        handler = self.handlers.get(self.spawner.starts[-1].handler_id)
        assert handler is not None
        handler.add_header("Content-Type", b"text/x-typed\n")
        self.spawner.exit()
        head = self.connect(http_request(b"HEAD", b"/nothing"))
        self.spawner.exit()

        code, headers, body = empty.response()
        self.assertEqual((code, body, header_values(headers, b"content-type")), (200, b"", []))
        self.assertEqual(header_values(typed.response()[1], b"content-type"), [b"text/x-typed"])
        self.assertEqual(header_values(head.response()[1], b"content-type"), [])

    def test_the_body_is_the_handlers_stdin_on_a_stdin_route(self) -> None:
        self.route("/x", method="POST", stdin="body")
        self.get("/x", method="POST", data=b"hello")
        [start] = self.spawner.starts
        self.assertEqual(start.stdin_content, b"hello")

    def test_a_failed_exit_gives_the_routes_error_status(self) -> None:
        self.route("/x", error_status=502)
        pending = self.get("/x")
        self.spawner.exit(status=3)
        self.assertEqual(self.answer(pending)[0], 502)

    def test_a_process_that_cannot_start_is_500(self) -> None:
        self.route("/x", max_concurrency=1)
        self.spawner.result = fail(SpawnError("no such program"))
        code, headers, body = self.answer(self.get("/x"))
        self.assertEqual((code, body), (500, b"Internal Server Error\n"))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [PLAIN])
        self.assertEqual((len(self.handlers), self.governor.running()), (0, 0))
        self.spawner.result = None
        self.get("/x")  # its slot was given back
        self.assertEqual(len(self.spawner.starts), 2)

    def test_a_client_that_leaves_ends_the_process_group(self) -> None:
        self.route("/x")
        connection = self.connect(http_request(target=b"/x"))
        connection.lose()
        self.assertEqual(self.signals, [(FakeSpawner.pgid(0), signal.SIGTERM)])
        self.spawner.exit(sig=signal.SIGTERM)
        self.assertEqual((len(self.handlers), self.governor.running()), (0, 0))
        self.assertEqual(connection.transport.value(), b"")

    def test_a_route_may_keep_its_handler_running_when_the_client_leaves(self) -> None:
        self.route("/x", keep_running_on_disconnect=True)
        self.connect(http_request(target=b"/x")).lose()
        self.assertEqual(self.signals, [])
        self.assertEqual(self.governor.running(), 1)

    def test_a_client_that_leaves_while_the_process_starts(self) -> None:
        self.route("/x")
        self.spawner.result = Deferred()
        connection = self.connect(http_request(target=b"/x"))
        connection.lose()
        self.spawner.result.callback(4321)  # the group is ended as soon as it is known
        self.assertEqual(self.signals, [(4321, signal.SIGTERM)])
        self.assertEqual(connection.transport.value(), b"")

    def test_a_handler_out_of_time_is_504_and_ended(self) -> None:
        self.route("/x", timeout=2)
        pending = self.get("/x")
        self.reactor.advance(2)
        self.assertEqual(self.signals, [(FakeSpawner.pgid(0), signal.SIGTERM)])
        code, _, body = self.answer(pending)
        self.assertEqual((code, body), (504, b"Gateway Timeout\n"))

    def test_killing_a_running_handler_ends_its_process_group(self) -> None:
        self.route("/x")
        pending = self.get("/x")
        [start] = self.spawner.starts
        self.assertTrue(self.api.kill(start.handler_id))
        self.assertEqual(self.signals, [(FakeSpawner.pgid(0), signal.SIGTERM)])
        self.spawner.exit(sig=signal.SIGTERM)
        self.assertEqual(self.answer(pending)[0], 200)
        self.assertFalse(self.api.kill(start.handler_id))
        self.assertIsNone(self.api.handler_info(start.handler_id))


class BrokenRoutes(RouteTable):
    def match(self, method: str, path: str) -> Match | None:
        raise ZeroDivisionError("a bug")


class UnexpectedErrorTests(SynchronousTestCase):
    def test_an_unexpected_error_is_a_plain_500_without_a_traceback(self) -> None:
        reactor = MemoryReactorClock()
        governor = Governor(reactor)
        api = UserAPI(
            routes=BrokenRoutes(),
            handlers=HandlerRegistry(),
            spawner=FakeSpawner(),
            governor=governor,
            admission=governor,
            reactor=reactor,
        )
        connection = SiteConnection(UserSite(api.resource(), reactor=reactor), http_request(target=b"/x"))
        code, headers, body = connection.response()
        self.assertEqual((code, body), (500, b"Internal Server Error\n"))
        self.assertEqual(header_values(headers, b"content-type"), [PLAIN])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


@implementer(IStreamServerEndpoint)
class _Recording:
    """An endpoint that listens on nothing and keeps the factory it was given."""

    def __init__(self) -> None:
        self.factories: list[IProtocolFactory] = []

    def listen(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.factories.append(factory)
        return succeed(None)


class PlainHTTPOnTheHTTPSPortTests(SynchronousTestCase):
    """
    The user interface over HTTPS answers a plain HTTP request as the
    reference does, however its bytes arrive; other listeners only close.
    """

    def connect(self, answer_plain_http: bool) -> tuple[IProtocol, StringTransport]:
        directory = Path(self.mktemp())
        directory.mkdir()
        pki = make_pki(directory)
        endpoint = _Recording()
        options = user_server_options(str(pki.server_chain), str(pki.server_key))
        tls_server_endpoint(endpoint, options, answer_plain_http=answer_plain_http).listen(
            Factory.forProtocol(Protocol)
        )
        protocol = endpoint.factories[0].buildProtocol(PEER)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_a_request_line_byte_by_byte_gets_the_400_and_the_connection_closes(self) -> None:
        protocol, transport = self.connect(answer_plain_http=True)
        for byte in b"HEAD / HTTP/1.0\r\n\r\n":
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(transport.value(), PLAIN_HTTP_ANSWER)
        self.assertTrue(transport.disconnecting)

    def test_what_is_neither_tls_nor_a_known_request_is_only_closed(self) -> None:
        protocol, transport = self.connect(answer_plain_http=True)
        protocol.dataReceived(b"DELETE / HTTP/1.1\r\n\r\n")
        self.assertNotIn(b"HTTP/1.0 400", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_another_listener_only_closes(self) -> None:
        protocol, transport = self.connect(answer_plain_http=False)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertNotIn(b"HTTP/1.0 400", transport.value())
        self.assertTrue(transport.disconnecting)
