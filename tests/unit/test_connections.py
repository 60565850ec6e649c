"""
The listeners' guards in memory, with a fake clock: header, body and idle
time limits of a channel, and the connection limit's count and its log.
The same behaviours against a real server: tests/e2e/test_abuse.py.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from kapow.web.connections import (
    ConnectionLimit,
    GuardedChannel,
    Timeouts,
    default_max_connections,
    guarded_protocol,
    is_loopback,
    with_backlog,
)


class Answer(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []

    def render(self, request: Any) -> Any:
        if request.path == b"/hold":
            self.held.append(request)
            return NOT_DONE_YET
        return b"ok"


def connect(timeouts: Timeouts, peer: str = "10.0.0.1") -> tuple[Clock, StringTransport, Any, Answer]:
    clock = Clock()
    resource = Answer()
    site = Site(resource, reactor=clock)
    site.protocol = guarded_protocol(timeouts, clock)
    protocol = site.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 1234))
    protocol.makeConnection(transport)
    return clock, transport, protocol, resource


def test_headers_trickling_past_the_header_timeout_get_408_and_a_close() -> None:
    clock, transport, protocol, _ = connect(Timeouts(header=1, idle=60, body_rate=100))
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):
        clock.advance(0.3)
        protocol.dataReceived(b"X")  # bytes keep coming, too slowly to matter
    assert not transport.disconnecting
    clock.advance(0.35)  # past the limit by at most one check (a quarter of it)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b'{"reason": "Request Timeout"}' in transport.value()
    assert transport.disconnecting


def test_an_idle_keep_alive_connection_closes_without_an_answer() -> None:
    clock, transport, protocol, _ = connect(Timeouts(header=1, idle=5, body_rate=100))
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().endswith(b"\r\n\r\nok")
    transport.clear()
    clock.advance(4.9)
    assert not transport.disconnecting  # the header timeout is not the idle one
    clock.advance(0.35)
    assert transport.disconnecting and transport.value() == b""


def test_a_request_being_handled_is_never_timed_out() -> None:
    clock, transport, protocol, resource = connect(Timeouts(header=1, idle=1, body_rate=100))
    protocol.dataReceived(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(3600)
    assert not transport.disconnecting
    request = resource.held[0]
    request.write(b"late")
    request.finish()
    clock.advance(1.3)  # idle again once answered
    assert transport.disconnecting


def test_loopback_peers_of_the_data_api_keep_idle_connections() -> None:
    timeouts = Timeouts(header=1, idle=1, body_rate=100, idle_on_loopback=False)
    clock, transport, protocol, _ = connect(timeouts, peer="127.0.0.1")
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(3600)
    assert not transport.disconnecting
    protocol.dataReceived(b"GET / HTTP/1.1\r\n")  # but a request must still come in time
    clock.advance(1.3)
    assert transport.disconnecting
    clock, transport, protocol, _ = connect(timeouts, peer="10.0.0.2")
    clock.advance(1.3)
    assert transport.disconnecting


def test_a_body_below_the_minimum_rate_is_cut_one_at_it_is_not() -> None:
    timeouts = Timeouts(header=2, idle=60, body_rate=100)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    clock, transport, protocol, _ = connect(timeouts)
    protocol.dataReceived(head)
    for _ in range(30):  # 50 bytes/s
        clock.advance(0.5)
        protocol.dataReceived(b"x" * 25)
        if transport.disconnecting:
            break
    assert transport.disconnecting and transport.value().startswith(b"HTTP/1.1 408 ")
    clock, transport, protocol, _ = connect(timeouts)
    protocol.dataReceived(head)
    for _ in range(10):  # 100 bytes/s, ten seconds in all
        clock.advance(1)
        protocol.dataReceived(b"x" * 100)
    assert not transport.disconnecting and transport.value().endswith(b"\r\n\r\nok")


class FakeEndpoint:
    def listen(self, factory: Any) -> Any:
        self.factory = factory
        return succeed(None)


class Counted:
    def __init__(self) -> None:
        self.lost = 0

    def connectionLost(self, reason: Failure) -> None:
        self.lost += 1


class Factory:
    def buildProtocol(self, addr: Any) -> Counted:
        return Counted()


def test_past_the_connection_limit_connections_are_refused_and_logged_once_a_second() -> None:
    clock = Clock()
    endpoint = FakeEndpoint()
    limit = ConnectionLimit(endpoint, 2, "user", clock)
    limit.listen(Factory())
    factory = endpoint.factory
    first, second = factory.buildProtocol(None), factory.buildProtocol(None)
    with capturedLogs() as events:
        assert [factory.buildProtocol(None) for _ in range(5)] == [None] * 5
        clock.advance(1)
        assert factory.buildProtocol(None) is None
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert [(e["n"], e["limit"]) for e in warnings] == [(1, 2), (5, 2)]
    first.connectionLost(Failure(Exception("gone")))
    assert first.lost == 1  # the protocol's own connectionLost still runs
    assert factory.buildProtocol(None) is not None
    assert factory.buildProtocol(None) is None
    assert second.lost == 0


def test_the_check_runs_only_while_connections_are_open() -> None:
    clock, _, protocol, _ = connect(Timeouts(header=1, idle=5, body_rate=100))
    assert len(clock.getDelayedCalls()) == 1  # the guard's check; no timer of twisted.web's
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(clock.getDelayedCalls()) == 1
    protocol.connectionLost(Failure(Exception("gone")))
    assert len(clock.getDelayedCalls()) == 1  # kept for a next connection until its next turn
    clock.advance(1)
    assert clock.getDelayedCalls() == []


def test_helpers() -> None:
    assert default_max_connections(1024) == 240
    assert default_max_connections(20) == 16
    assert with_backlog("tcp:port=80", 4096) == "tcp:port=80:backlog=4096"
    assert with_backlog("tcp:port=80:backlog=5", 4096) == "tcp:port=80:backlog=5"
    assert with_backlog("systemd:domain=INET:index=0", 4096) == "systemd:domain=INET:index=0"
    assert is_loopback(IPv4Address("TCP", "127.0.0.2", 1)) and not is_loopback(
        IPv4Address("TCP", "10.0.0.1", 1)
    )


def test_only_tls_connections_get_twisted_webs_negotiating_wrapper() -> None:
    clock = Clock()
    for tls, wrapped in ((True, True), (False, False)):
        site = Site(Answer(), reactor=clock)
        site.protocol = guarded_protocol(Timeouts(header=1, idle=5, body_rate=100), clock, tls=tls)
        protocol = site.buildProtocol(None)
        assert isinstance(protocol, GuardedChannel) is not wrapped
        assert protocol.site is site  # set through the wrapper or on the channel itself
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1234))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 200 OK") and transport.value().endswith(b"ok")
