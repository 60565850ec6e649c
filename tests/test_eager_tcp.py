"""
Connections that send at once (kapow.eager_tcp), over real TCP on 127.0.0.1:
what the socket takes goes out in the write itself, the rest is buffered
with the usual flow control, and every byte arrives in order.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from kapow.eager_tcp import EagerEndpoint, EagerServer, send_now

BIG = 32 * 1024 * 1024  # more than any socket buffer takes at once


class Server(Protocol):
    def connectionMade(self) -> None:
        self.factory.connected.callback(self)


class Collect(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.received = 0
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)
        self.received += len(data)

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(b"".join(self.data))


@implementer(IPushProducer)
class Push:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


@implementer(IPullProducer)
class Pull:
    def __init__(self) -> None:
        self.asked = 0

    def resumeProducing(self) -> None:
        self.asked += 1

    def stopProducing(self) -> None:
        pass


class EagerTests(TestCase):
    @inlineCallbacks
    def connect(self) -> Any:
        factory = Factory.forProtocol(Server)
        factory.connected = Deferred()
        port = yield EagerEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")).listen(factory)
        self.addCleanup(port.stopListening)
        client = Collect()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(lambda: client)
        )
        server = yield factory.connected
        self.addCleanup(server.transport.abortConnection)
        self.addCleanup(client.transport.abortConnection)
        return server, client

    @inlineCallbacks
    def test_a_write_the_socket_takes_is_sent_at_once(self) -> Any:
        server, client = yield self.connect()
        transport = server.transport
        self.assertIsInstance(transport, EagerServer)
        transport.writeSequence([b"HTTP/1.1 200 OK\r\n", b"\r\n"])
        transport.write(b"hello")
        self.assertNotIn(transport, reactor.getWriters())  # nothing left for a later turn
        transport.loseConnection()
        received = yield client.done
        self.assertEqual(received, b"HTTP/1.1 200 OK\r\n\r\nhello")

    @inlineCallbacks
    def test_what_the_socket_does_not_take_is_buffered_in_order_and_pauses_the_producer(self) -> Any:
        server, client = yield self.connect()
        transport = server.transport
        producer = Push()
        transport.registerProducer(producer, True)
        client.transport.pauseProducing()  # the client reads nothing for now
        big = bytes(range(256)) * (BIG // 256)
        transport.write(big)
        self.assertIn(transport, reactor.getWriters())
        self.assertEqual(producer.calls, ["pause"])
        transport.write(b"after")  # behind what waits: buffered, never before it
        client.transport.resumeProducing()
        while "resume" not in producer.calls:
            yield deferLater(reactor, 0.01, lambda: None)
        transport.unregisterProducer()
        transport.loseConnection()
        received = yield client.done
        self.assertEqual(len(received), BIG + 5)
        self.assertTrue(received == big + b"after")

    @inlineCallbacks
    def test_a_pull_producer_keeps_the_buffered_way(self) -> Any:
        server, client = yield self.connect()
        transport = server.transport
        producer = Pull()
        transport.registerProducer(producer, False)
        asked = producer.asked
        transport.write(b"chunk")
        self.assertIn(transport, reactor.getWriters())
        while producer.asked == asked:  # asked for more once the chunk went out
            yield deferLater(reactor, 0.01, lambda: None)
        transport.unregisterProducer()
        transport.loseConnection()
        received = yield client.done
        self.assertEqual(received, b"chunk")

    @inlineCallbacks
    def test_writing_to_a_connection_the_peer_closed_ends_it_cleanly(self) -> Any:
        server, client = yield self.connect()
        lost: Deferred[None] = Deferred()
        server.connectionLost = lambda reason: lost.callback(None)
        client.transport.abortConnection()
        yield client.done
        for _ in range(50):  # until a send meets the reset
            if lost.called:
                break
            server.transport.write(b"x" * 65536)
            yield deferLater(reactor, 0.01, lambda: None)
        yield lost


class SendNowTests(TestCase):
    def test_what_waits_for_the_next_turn_goes_out_now(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(theirs.close)
        protocol = Protocol()
        factory = Factory.forProtocol(lambda: protocol)
        reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        ours.close()
        transport = protocol.transport
        self.addCleanup(transport.abortConnection)
        transport.write(b"released")
        self.assertIn(transport, reactor.getWriters())
        send_now(transport)
        self.assertNotIn(transport, reactor.getWriters())
        theirs.setblocking(False)
        self.assertEqual(theirs.recv(100), b"released")
        send_now(transport)  # nothing waits: nothing happens
        send_now(None)  # nor for what is no socket transport
