"""
A Twisted program that talks to a WebSocket route with Twisted's own client
(:mod:`twisted.web.websocket`): ``twisted_websocket.py URL MESSAGE...``
sends each message, prints each message received, one a line, and closes
once it has as many answers as it sent.
"""

from __future__ import annotations

import sys

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.python.failure import Failure
from twisted.web.websocket import WebSocketClientEndpoint, WebSocketTransport


class Talk:
    def __init__(self, messages: list[str]) -> None:
        self.messages = messages
        self.answers: list[str] = []
        self.done: Deferred[None] = Deferred()
        self.transport: WebSocketTransport | None = None

    def buildProtocol(self, url: str) -> Talk:
        return self

    def negotiationStarted(self, transport: WebSocketTransport) -> None:
        self.transport = transport

    def negotiationFinished(self) -> None:
        assert self.transport is not None
        for message in self.messages:
            self.transport.sendTextMessage(message)

    def textMessageReceived(self, message: str) -> None:
        self.answers.append(message)
        print(message, flush=True)
        if len(self.answers) == len(self.messages) and self.transport is not None:
            self.transport.loseConnection()

    def bytesMessageReceived(self, data: bytes) -> None:
        self.textMessageReceived(data.decode("utf-8", "replace"))

    def pongReceived(self, payload: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.callback(None)


async def main(reactor: object, url: str, *messages: str) -> None:
    talk = Talk(list(messages))
    await WebSocketClientEndpoint.new(reactor, url).connect(talk)  # type: ignore[arg-type]
    await talk.done


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor, *sys.argv[1:])))
