"""
TCP connections that send at once.

Twisted's TCP transport buffers every write and sends it once the reactor's
next turn finds the socket writable: three system calls (register the socket
for writing, send, unregister it) and a reactor turn for each response. An
HTTP response usually finds nothing waiting before it, and a socket that can
take it whole, so :class:`EagerServer` sends it in the write itself; what the
socket does not take, and anything written while something waits, is
buffered as before, with the same flow control (a streaming producer is
paused when the buffer fills). A non-streaming producer is asked for more
only when the buffer drains, so its connection keeps the buffered way.

Where one message must arrive before a response that goes out at once (a
worker's word to the main process that a limited handler exited, before
its client can ask again), :func:`send_now` sends what another connection
holds for the next turn.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import abstract, tcp
from twisted.internet.defer import Deferred


class EagerServer(tcp.Server):
    """A server-side TCP connection that sends at once when nothing waits to be sent."""

    def write(self, data: bytes) -> None:
        if data and self._nothing_waits():
            data = self._send(data)
        super().write(data)

    def writeSequence(self, iovec: Any) -> None:
        if self._nothing_waits():
            iovec = list(iovec)
            if iovec:
                super().write(self._send(b"".join(iovec)))
                return
        super().writeSequence(iovec)

    def _nothing_waits(self) -> bool:
        return (
            self.connected
            and not self.disconnecting
            and not self._writeDisconnected
            and not self._tempDataBuffer
            and self.offset == len(self.dataBuffer)
            and (self.producer is None or self.streamingProducer)
        )

    def _send(self, data: bytes) -> bytes:
        """Send what the socket takes now; the rest (all of it on an error, which the buffered way then meets)."""
        try:
            sent = self.socket.send(data)
        except OSError:
            return data
        return data[sent:]


def send_now(transport: Any) -> None:
    """
    Send now what a Twisted socket ``transport`` holds for the reactor's
    next turn. What the socket does not take, and an error, are left to
    that turn, as they would have been.
    """
    if (
        isinstance(transport, abstract.FileDescriptor)
        and transport.connected
        and not transport.disconnecting
        and (transport._tempDataBuffer or transport.offset < len(transport.dataBuffer))
    ):
        transport.doWrite()


class EagerEndpoint:
    """A stream server endpoint whose TCP connections are :class:`EagerServer`\\ s."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    def listen(self, factory: Any) -> Deferred[Any]:
        return self.endpoint.listen(factory).addCallback(_eager)


def _eager(port: Any) -> Any:
    """Let ``port`` make :class:`EagerServer` connections, if it is a plain TCP port."""
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = EagerServer
    return port
