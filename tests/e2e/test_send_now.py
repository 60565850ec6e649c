"""kapow.user.site.send_now on a real TCP connection: a finished answer leaves at once."""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from kapow.user.site import send_now


class _Kept(Protocol):
    def __init__(self, made: Deferred[Protocol]) -> None:
        self.made = made

    def connectionMade(self) -> None:
        self.made.callback(self)


class _Channel:
    """What send_now reads of a channel: its transport, here wrapped once as a TLS layer or a wrapper is."""

    def __init__(self, transport: object) -> None:
        self.transport = type("Wrapper", (), {"transport": transport})()


class SendNowTests(TestCase):
    async def connected(self) -> tuple[Protocol, socket.socket]:
        made: Deferred[Protocol] = Deferred()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: _Kept(made)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        server = await made
        self.addCleanup(server.transport.loseConnection)
        client.settimeout(5)
        return server, client

    async def test_what_is_written_is_sent_before_the_reactor_turns(self) -> None:
        server, client = await self.connected()
        server.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        send_now(_Channel(server.transport))
        client.setblocking(False)
        self.assertEqual(client.recv(100), b"HTTP/1.1 200 OK\r\n\r\n")  # no reactor turn in between

    async def test_a_closing_connection_is_left_to_the_reactor(self) -> None:
        server, client = await self.connected()
        server.transport.write(b"bye")
        server.transport.loseConnection()
        send_now(_Channel(server.transport))
        client.setblocking(False)
        with self.assertRaises(BlockingIOError):
            client.recv(100)
        await deferLater(reactor, 0.1, lambda: None)  # the reactor's turns
        client.settimeout(5)  # never a wait without end on the reactor's thread
        self.assertEqual(client.recv(100), b"bye")  # sent by the reactor, then closed
        self.assertEqual(client.recv(100), b"")

    def test_no_tcp_connection_beneath_is_nothing_to_do(self) -> None:
        send_now(_Channel(None))
        send_now(object())
