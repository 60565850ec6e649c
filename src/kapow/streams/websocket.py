# -*- test-case-name: tests.unit.test_streams,tests.e2e.test_websocket -*-
"""
WebSocket routes (``mode: "websocket"``, SPEC.md §11) on Twisted's own
:mod:`twisted.web.websocket`: the upgrade checked (:func:`upgrade_refusal`)
and completed (:func:`accept`), then a :class:`ProcessWebSocket` joins the
connection's messages to one process's stdin and stdout, with flow control
both ways and nothing held without bound.

Twisted's wire protocol assembles a message's fragments before it delivers
it; :class:`ProcessWebSocket` gives it buffers that stop at ``max_message``
bytes and close the connection with 1009 instead (``_textBuffer`` and
``_bytesBuffer``: the wire protocol's, as Twisted 25.5 to 26.10 name them;
``tests/unit/test_streams.py`` checks they are still there).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar, cast

from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.python.failure import Failure
from twisted.web.server import Request
from twisted.web.websocket import WebSocketResource, WebSocketTransport
from wsproto.utilities import LocalProtocolError
from zope.interface import implementer

from kapow.core.routes import Route, origin_key
from kapow.streams.lines import Lines, ProcessOutput

__all__ = [
    "GOING_AWAY",
    "NORMAL",
    "SERVER_ERROR",
    "TOO_BIG",
    "ProcessWebSocket",
    "accept",
    "upgrade_refusal",
]

NORMAL, GOING_AWAY, POLICY, TOO_BIG, SERVER_ERROR = 1000, 1001, 1008, 1009, 1011

#: Bytes of received messages that may wait for the process to read them
#: before the server stops reading the connection.
STDIN_WAITING = 1024 * 1024

#: Seconds the rest of the output may take to arrive once the process exited.
OUTPUT_GRACE = 1.0

#: A refusal of an upgrade: status, body, extra headers.
Refusal = tuple[int, bytes, Sequence[tuple[bytes, bytes]]]

_UPGRADE_REQUIRED: Refusal = (
    426,
    b"Upgrade Required\n",
    ((b"Upgrade", b"websocket"), (b"Sec-WebSocket-Version", b"13")),
)
_FORBIDDEN: Refusal = (403, b"Forbidden\n", ())


def _tokens(request: Request, name: bytes) -> set[bytes]:
    values = request.requestHeaders.getRawHeaders(name, [])
    return {token.strip().lower() for value in values for token in value.split(b",")}


def _valid_key(request: Request) -> bool:
    keys = request.requestHeaders.getRawHeaders(b"sec-websocket-key", [])
    if len(keys) != 1:
        return False
    try:
        return len(base64.b64decode(keys[0].strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def upgrade_refusal(request: Request, route: Route) -> Refusal | None:
    """
    Why ``request`` cannot become a WebSocket connection of ``route``, or
    ``None``: 426 without a valid RFC 6455 upgrade (or over HTTP/2), 403 for
    an ``Origin`` that is neither the request's own (scheme and ``Host``)
    nor one the route allows.
    """
    valid = (
        request.method == b"GET"
        and request.clientproto == b"HTTP/1.1"
        and b"websocket" in _tokens(request, b"upgrade")
        and b"upgrade" in _tokens(request, b"connection")
        and request.requestHeaders.getRawHeaders(b"sec-websocket-version") == [b"13"]
        and _valid_key(request)
    )
    if not valid:
        return _UPGRADE_REQUIRED
    origin = request.requestHeaders.getRawHeaders(b"origin")
    if origin is None:
        return None
    given = origin[0].decode("latin-1")
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    own = origin_key(f"{'https' if request.isSecure() else 'http'}://{host}")
    if (own is not None and origin_key(given) == own) or route.allows_origin(given):
        return None
    return _FORBIDDEN


#: A message's text, or its bytes.
_Message = TypeVar("_Message", str, bytes)


class _Bounded(Generic[_Message]):
    """A message being assembled, in the wire protocol's place: at most ``limit`` bytes."""

    def __init__(self, empty: _Message, limit: int, too_big: Callable[[], None]) -> None:
        self.data: _Message = empty
        self._empty: _Message = empty
        self.limit = limit
        self.too_big = too_big
        self.size = 0
        self.over = False

    def add(self, new: _Message) -> None:
        if self.over:
            return
        self.size += len(new.encode()) if isinstance(new, str) else len(new)
        if self.size > self.limit:
            self.over = True
            self.data = self._empty
            self.too_big()
        else:
            self.data += new

    def done(self) -> _Message:
        result, self.data, self.size, self.over = self.data, self._empty, 0, False
        return result


@implementer(IPushProducer)
class _Reading:
    """The connection's reading, paused while the process has not read what it was sent."""

    def __init__(self, transport: ITransport) -> None:
        # a TLS connection pauses through the connection it wraps
        while not IPushProducer.providedBy(transport) and getattr(transport, "transport", None) is not None:
            transport = transport.transport  # type: ignore[attr-defined]
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        pass  # stdin closed: the connection stays until the process exits


class ProcessWebSocket:
    """
    One WebSocket connection and its process (a
    :class:`twisted.web.websocket.WebSocketProtocol`, and a
    :class:`kapow.handlers.spawn.ProcessStream`).

    :param request: the upgrade request.
    :param clock: the reactor's clock.
    :param binary: messages are the bytes as they are (else lines).
    :param max_message: the largest message received, in bytes.
    :param ping: seconds between pings (0: none).
    :param counted: told ``("in" | "out")`` of each message.
    :param opened: called when the connection is open, and again (with
        ``False``) when it is lost.
    """

    wants_stdin = True

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        *,
        binary: bool,
        max_message: int,
        ping: float,
        counted: Callable[[str], None] | None = None,
        opened: Callable[[bool], None] | None = None,
    ) -> None:
        self.request = request
        self.clock = clock
        self.binary = binary
        self.max_message = max_message
        self.ping_every = ping
        self.counted = counted
        self.opened = opened
        self.wire: WebSocketTransport | None = None
        self.process: IProcessTransport | None = None
        self.sent_bytes = 0
        self.closing = False
        self.lost = False
        self._lines = Lines(max_message)
        self._early: list[bytes] = []
        self._pong_due = False
        self._pinging: IDelayedCall | None = None
        self._exited: bool | None = None  # whether it failed, once it exited
        self._output_over = False
        self._grace: IDelayedCall | None = None
        self._reading: _Reading | None = None

    # -- the connection (WebSocketProtocol) ----------------------------------

    def negotiationStarted(self, transport: WebSocketTransport) -> None:
        self.wire = transport
        for name, empty in (("_textBuffer", ""), ("_bytesBuffer", b"")):
            setattr(transport, name, _Bounded(empty, self.max_message, self._too_big))

    def negotiationFinished(self) -> None:
        transport = self.request.channel.transport
        assert transport is not None  # negotiated just now
        self._reading = _Reading(transport)
        if self.process is None:
            self._reading.pauseProducing()  # until there is a process to read the messages
        if self.opened is not None:
            self.opened(True)
        self._schedule_ping()

    def textMessageReceived(self, message: str) -> None:
        self._received(message.encode())

    def bytesMessageReceived(self, data: bytes | bytearray) -> None:
        self._received(bytes(data))

    def pongReceived(self, payload: bytes) -> None:
        self._pong_due = False

    def connectionLost(self, reason: Failure) -> None:
        self.lost = self.closing = True
        self._cancel()
        if self.opened is not None:
            self.opened(False)
        process = self.process
        if process is not None:
            process.closeStdin()

    # -- the process (ProcessStream) -----------------------------------------

    def process_started(self, process: IProcessTransport) -> None:
        self.process = process
        if self.lost:
            process.closeStdin()
            return
        stdin = getattr(process, "pipes", {}).get(0)
        if stdin is not None:
            stdin.bufferSize = STDIN_WAITING
        if self._reading is not None:
            process.registerProducer(self._reading, True)  # type: ignore[attr-defined]  # both providers' transports consume
        self.request.registerProducer(ProcessOutput(process), True)
        early, self._early = self._early, []
        for data in early:
            process.writeToChild(0, data)
        if self._reading is not None:
            self._reading.resumeProducing()

    def output(self, data: bytes) -> None:
        if self.closing:
            return
        if self.binary:
            self._send(data)
            return
        for line in self._lines.feed(data):
            self._send(line)

    def output_ended(self) -> None:
        self._output_over = True
        rest = self._lines.rest()
        if rest is not None and not self.closing:
            self._send(rest)
        if self._exited is not None:
            self._closed_by_process()

    # -- the handler (ResponseStream) ----------------------------------------

    def process_exited(self, failed: bool) -> None:
        self._exited = failed
        if self._output_over:
            self._closed_by_process()
        elif self._grace is None:
            self._grace = self.clock.callLater(OUTPUT_GRACE, self._closed_by_process)

    def time_out(self) -> None:
        self.close(SERVER_ERROR, "timeout")

    def going_away(self) -> None:
        self.close(GOING_AWAY, "server stopping")

    # -- inside --------------------------------------------------------------

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame with ``code`` and close the connection."""
        if self.closing:
            return
        self.closing = True
        self._cancel()
        wire = self.wire
        if wire is None:
            return
        try:
            wire.loseConnection(code, reason)  # type: ignore[call-arg]  # Twisted's wire protocol takes a reason too
        except LocalProtocolError:  # the client closed first: its close is being answered
            pass

    def _closed_by_process(self) -> None:
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        self.close(SERVER_ERROR if self._exited else NORMAL)

    def _received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.counted is not None:
            self.counted("in")
        if not self.binary:
            data += b"\n"
        process = self.process
        if process is None:
            self._early.append(data)
            return
        try:
            process.writeToChild(0, data)
        except KeyError:
            pass  # it closed its stdin: what it does not read is dropped

    def _send(self, data: bytes) -> None:
        wire = self.wire
        assert wire is not None  # negotiated before the process started
        try:
            if self.binary:
                wire.sendBytesMessage(data)
            else:
                try:
                    wire.sendTextMessage(data.decode("utf-8"))
                except UnicodeDecodeError:
                    wire.sendBytesMessage(data)
        except LocalProtocolError:  # the client is closing
            self.closing = True
            return
        self.sent_bytes += len(data)
        if self.counted is not None:
            self.counted("out")

    def _too_big(self) -> None:
        self.close(TOO_BIG, "message too big")

    def _schedule_ping(self) -> None:
        if self.ping_every > 0 and not self.closing:
            self._pinging = self.clock.callLater(self.ping_every, self._ping)

    def _ping(self) -> None:
        self._pinging = None
        if self.closing or self.wire is None:
            return
        if self._pong_due:  # no pong since the last ping: the peer is gone
            self.close(POLICY, "no pong")
            channel = self.request.channel
            if channel is not None:
                _abort(channel.transport)  # it does not read: do not wait to flush
            return
        self._pong_due = True
        try:
            self.wire.ping(b"kapow")
        except LocalProtocolError:
            return
        self._schedule_ping()

    def _cancel(self) -> None:
        for call in (self._pinging, self._grace):
            if call is not None and call.active():
                call.cancel()
        self._pinging = self._grace = None


def _abort(transport: ITransport | None) -> None:
    """Close ``transport`` at once, without flushing what waits to be sent."""
    if transport is not None:
        cast(ITCPTransport, transport).abortConnection()  # TCP, or TLS over it: both abort


class _Factory:
    def __init__(self, protocol: ProcessWebSocket) -> None:
        self.protocol = protocol

    def buildProtocol(self, request: Request) -> ProcessWebSocket:
        return self.protocol


def accept(request: Request, protocol: ProcessWebSocket) -> None:
    """
    Complete the upgrade of ``request`` (checked by :func:`upgrade_refusal`)
    with Twisted's :class:`~twisted.web.websocket.WebSocketResource`: the
    connection is ``protocol``'s from now on. When it is lost, the request
    is too, as any request's: the listener counts it closed, the handler's
    client is gone, the access log has its line.
    """
    channel = request.channel
    before_lost = channel.connectionLost
    WebSocketResource(_Factory(protocol)).render_GET(request)
    wire_received, wire_lost = channel.dataReceived, channel.connectionLost
    request.setResponseCode(101)
    request.kapow_upgraded = True  # type: ignore[attr-defined]  # our mark, read by the site

    def received(data: bytes) -> None:
        try:
            wire_received(data)
        except LocalProtocolError:  # bytes after the close
            _abort(channel.transport)

    def lost(reason: Failure) -> None:
        wire_lost(reason)
        request.sentLength = protocol.sent_bytes
        before_lost(reason)

    # where Twisted's upgrade put the wire protocol's: the channel is made by twisted.web
    channel.dataReceived = received  # type: ignore[method-assign]
    channel.connectionLost = lost  # type: ignore[method-assign]
