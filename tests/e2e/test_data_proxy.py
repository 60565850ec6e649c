"""
The data API of ``--data-bind`` under ``--workers``, on loopback: a real
DataProxy in front of a real worker's data app (DataAPI), both on 127.0.0.1
port 0, with handlers of in-memory user requests. What the proxy must carry
as the worker answered it: every method, the status code and its reason
phrase.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from kapow.data.api import DataAPI
from kapow.data.proxy import DataProxy
from kapow.handlers.handler import HandlerRegistry
from tests.support.user_connection import ROUTE, UserConnection, header_values, http_request


class DataProxyTests(TestCase):
    def setUp(self) -> None:
        self.registry = HandlerRegistry()
        worker = reactor.listenTCP(0, Site(DataAPI(self.registry).resource()), interface="127.0.0.1")
        self.addCleanup(worker.stopListening)
        address = ("127.0.0.1", worker.getHost().port)
        self.proxy = DataProxy(reactor, lambda handler_id: None if handler_id == "gone" * 8 else address)
        front = reactor.listenTCP(0, Site(self.proxy), interface="127.0.0.1")
        self.addCleanup(front.stopListening)
        self.addCleanup(self.proxy.agent._pool.closeCachedConnections)
        self.url = f"http://127.0.0.1:{front.getHost().port}/handlers/"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    async def call(self, method: str, path: str, data: bytes | None = None) -> tuple[int, bytes, Any]:
        response = await treq.request(method, self.url + path, data=data, pool=self.pool)
        body = await response.content()
        return response.code, response.phrase, json.loads(body) if body else None

    async def test_delete_and_reason_phrases_pass_through(self) -> None:
        connection = UserConnection(http_request())
        handler = self.registry.create(ROUTE, {}, connection.request)
        for value in (b"1", b"2"):
            self.assertEqual((await self.call("PUT", handler.id + "/response/headers/X-A", value))[0], 200)
        self.assertEqual(await self.call("DELETE", handler.id + "/response/headers/X-A"), (200, b"OK", None))
        self.assertEqual(
            await self.call("PUT", handler.id + "/response/reason", b"a\nb"),
            (
                400,
                b"Invalid Reason Phrase",
                {
                    "reason": "Invalid Reason Phrase",
                    "detail": "the reason phrase holds the control character '\\n' at byte 1",
                },
            ),
        )
        self.assertEqual(
            await self.call("GET", handler.id + "/request/headers/%ff"),
            (
                400,
                b"Invalid Resource Path",
                {"reason": "Invalid Resource Path", "detail": "the path is not UTF-8 once percent-decoded"},
            ),
        )
        self.assertEqual((await self.call("PUT", handler.id + "/response/end", b""))[0], 200)
        self.assertEqual(
            await self.call("DELETE", handler.id + "/response/cookies/c"),
            (409, b"Response Already Ended", {"reason": "Response Already Ended"}),
        )
        code, headers, _ = connection.response()
        self.assertEqual((code, header_values(headers, b"X-A")), (200, []))

    async def test_a_handler_of_no_live_worker(self) -> None:
        self.assertEqual(
            await self.call("DELETE", "gone" * 8 + "/response/headers/X-A"),
            (404, b"Handler ID Not Found", {"reason": "Handler ID Not Found"}),
        )
