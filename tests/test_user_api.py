"""The user interface in memory (StubTreq), where admission is decided elsewhere."""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import TestCase

from kapow.governor import Governor, Limits
from kapow.handlers import HandlerRegistry
from kapow.routes import Route, RouteTable
from kapow.user_api import UserAPI


class Unreachable:
    """An admission whose answer never comes: the link to it broke."""

    def admit(self, route: Route) -> Deferred[str | None]:
        return fail(ConnectionError("the main process went away"))

    def release(self, route: Route) -> None:
        raise AssertionError("nothing was admitted")


class AdmissionTests(TestCase):
    timeout = 10

    async def test_an_admission_that_fails_answers_503(self) -> None:
        from twisted.internet import reactor

        routes = RouteTable()
        routes.append(Route("r1", "GET", "/x", command="true"))
        governor = Governor(reactor, Limits())
        spawner: Any = None  # never reached
        api = UserAPI(routes, HandlerRegistry(), spawner, governor, Unreachable())
        response = await StubTreq(api).get("http://user/x")
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
