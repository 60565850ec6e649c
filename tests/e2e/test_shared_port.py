"""The user port that workers share (kapow.server.workers.worker.GatedEndpoint), on a real socket."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from kapow.server.workers.worker import GatedEndpoint


class SharedPortTests(TestCase):
    """The user port workers share, on a real socket."""

    async def test_one_connection_accepted_each_time_the_socket_is_ready(self) -> None:
        built: list[Protocol] = []

        class Counting(Factory):
            def buildProtocol(self, addr: Any) -> Protocol:
                built.append(Protocol())
                return built[-1]

        gate = GatedEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        listening = gate.listen(Counting())
        self.assertNoResult(listening)  # not before it is opened
        await gate.open()
        port = self.successResultOf(listening)
        clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(3)]
        try:
            port.doRead()  # three are waiting: one is taken, the others stay for the next read
            self.assertEqual(len(built), 1)
            port.doRead()
            self.assertEqual(len(built), 2)
        finally:
            for client in clients:
                client.close()
            for protocol in built:
                protocol.transport.abortConnection()
            await port.stopListening()
            await deferLater(reactor, 0, lambda: None)
