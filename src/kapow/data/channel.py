"""
The data API's connections (:class:`DataChannel`): the short requests that
handlers' ``kapow get``/``set``/``unset`` send are answered here, without
twisted.web's request machinery; every other request goes through
twisted.web, as on the other listeners.

A handler makes several data calls per user request, each on a connection
of its own or a kept-alive one, and for these twisted.web's line-by-line
parsing, ``Request`` and ``Headers`` objects cost more than the answer
itself. So a request that arrives whole and plain (``GET``, ``PUT`` or
``DELETE`` of ``/handlers/...`` without a query, over HTTP/1.1, a body only
by ``Content-Length`` and at most :data:`MAX_BODY` bytes, headers all of
the usual shape) is parsed here and handed to the same
:class:`kapow.data.api.DataAPI` as a :class:`_Call`, and its answer is
written with the bytes twisted.web would have written: the same status
line, headers in the same order, the same framing. Anything else — another
method or version, ``Transfer-Encoding``, ``Expect``, an odd header, a
larger body, a streamed read of a body or file — and the connection is
twisted.web's from that byte on, for good, with everything received so far.
``tests/unit/test_data_channel.py`` sends the same requests both ways and
compares the answers byte for byte.
"""

from __future__ import annotations

import enum
import io
import re
from typing import Final
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import NOT_DONE_YET, Request, Site, version

from kapow.web.connections import BODY, HANDLING, HEADERS, IDLE, GuardedChannel

#: The largest request body answered here (a ``kapow set`` append is at most this).
MAX_BODY = 64 * 1024
#: The largest request head answered here.
MAX_HEAD = 8 * 1024

_METHODS = (b"GET", b"PUT", b"DELETE")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PLAIN_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_PLAIN_TARGET = re.compile(rb"/handlers/[\x21-\x22\x24-\x3e\x40-\x7e]*")  # printable, no ? or #
#: Headers that ask for what only twisted.web does here.
_NOT_HERE = (b"transfer-encoding", b"expect", b"content-encoding")
#: GETs whose value is streamed from a file by a producer: twisted.web's.
_STREAMED = (b"body", b"content")
#: The type twisted.web gives a body of no stated type.
_DEFAULT_TYPE = Request.defaultContentType or b"text/html"


class _Incomplete(enum.Enum):
    NEED_MORE = enum.auto()


#: A request that has not all arrived yet.
_NEED_MORE: Final = _Incomplete.NEED_MORE
#: A plain request: method, target, body, whether the connection closes after
#: it, and how many bytes of what was received it took.
_Plain = tuple[bytes, bytes, bytes, bool, int]


class _Call:
    """
    One data call as :class:`~kapow.data.api.DataAPI` reads and answers it:
    the part of twisted.web's ``IRequest`` it uses, and an answer written to
    the connection as twisted.web's ``Request`` writes it.
    """

    code = http.OK
    code_message = b"OK"
    finished = False
    _disconnected = False
    startedWriting = False
    chunked = False

    def __init__(self, channel: DataChannel, method: bytes, uri: bytes, body: bytes, close: bool) -> None:
        self.channel = channel
        self.method = method
        self.uri = self.path = uri
        self.postpath = [unquote_to_bytes(segment) for segment in uri[1:].split(b"/")]
        self.content = io.BytesIO(body)
        # as twisted.web sets them, in its order: lower-case name -> (name, value)
        self.headers: dict[bytes, tuple[bytes, bytes]] = {}
        if close:
            self.headers[b"connection"] = (b"Connection", b"close")
        self.headers[b"server"] = (b"Server", version)
        self.headers[b"date"] = (b"Date", http.datetimeToString(channel.guard.clock.seconds()))

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = (name, value)

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = message if message is not None else http.RESPONSES.get(code, b"Unknown Status")

    def write(self, data: bytes) -> None:
        if self._disconnected:
            return
        transport = self.channel.transport
        if not self.startedWriting:
            self.startedWriting = True
            headers = self.headers
            length = headers.get(b"content-length")
            if b"content-type" not in headers and not (length and length[1] == b"0"):
                headers[b"content-type"] = (b"Content-Type", _DEFAULT_TYPE)
            if length is None:
                headers[b"transfer-encoding"] = (b"Transfer-Encoding", b"chunked")
                self.chunked = True
            head = [b"HTTP/1.1 %d %s\r\n" % (self.code, self.code_message)]
            head += [b"%s: %s\r\n" % pair for pair in headers.values()]
            head.append(b"\r\n")
            if data and not self.chunked:
                head.append(data)
                data = b""
            transport.write(b"".join(head))
        if data:
            transport.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def finish(self) -> None:
        if not self.startedWriting:
            self.write(b"")
        if self.chunked and not self._disconnected:
            self.channel.transport.write(b"0\r\n\r\n")
        self.finished = True
        self.channel.call_done(self)


class DataChannel(GuardedChannel):
    """
    A :class:`~kapow.web.connections.GuardedChannel` for the data API's site
    that answers the plain requests itself (see the module's description)
    and hands everything else to twisted.web.
    """

    #: set by the site that builds it
    site: Site
    #: connected: the channel answers calls only between its connection's making and loss
    transport: ITransport

    _plain = True  # False once twisted.web has the connection
    _pending = b""
    _call: _Call | None = None  # the call being answered
    _answering = False
    _closing = False
    _paused = False

    def dataReceived(self, data: bytes) -> None:
        if not self._plain:
            super().dataReceived(data)
            return
        if self._closing:
            return
        if self.phase == IDLE:
            self.phase = HEADERS
            self.since = self.guard.clock.seconds()
        self._pending += data
        if self._call is None:
            self._answer_pending()
        else:  # more, while a call is answered: no more reading until it is
            self._pause()

    def _answer_pending(self) -> None:
        if self._answering:  # a call answered at once, from within the loop below
            return
        self._answering = True
        try:
            while self._pending and self._call is None and self._plain:
                parsed = self._parse(self._pending)
                if parsed is _NEED_MORE:
                    return
                if parsed is None:
                    self._hand_over()
                    return
                method, uri, body, close, used = parsed
                self._pending = self._pending[used:]
                self.phase = HANDLING
                self._call = call = _Call(self, method, uri, body, close)
                answer = self.site.resource.render(call)
                if answer is not NOT_DONE_YET:
                    call.setHeader(b"Content-Length", b"%d" % len(answer))
                    call.write(answer)
                    call.finish()
                elif self._call is not None:  # answered later: nothing is read until then
                    self._pause()
        finally:
            self._answering = False

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._networkProducer.pauseProducing()

    def call_done(self, call: _Call) -> None:
        """``call`` was answered: on to the next request, or the end of the connection."""
        self.site.log(call)  # type: ignore[arg-type]  # a _Call has all of a request the data sites log
        self._call = None
        if call._disconnected:
            return
        if b"connection" in call.headers:  # nothing after it is read
            self._pending = b""
            self._closing = True
            self.loseConnection()
            return
        self.phase = HEADERS if self._pending else IDLE
        self.since = self.guard.clock.seconds()
        if self._paused:
            self._paused = False
            if not self._waitingForTransport:
                self._networkProducer.resumeProducing()
        self._answer_pending()

    def _hand_over(self) -> None:
        """From here on twisted.web serves the connection, from what was received."""
        self._plain = False
        pending, self._pending = self._pending, b""
        super().dataReceived(pending)

    def _parse(self, data: bytes) -> _Plain | _Incomplete | None:
        """
        ``(method, uri, body, close, length)`` of the plain request at the
        start of ``data``; ``_NEED_MORE`` if it has not all arrived; ``None``
        for one that is twisted.web's.
        """
        end = data.find(b"\r\n\r\n", 0, MAX_HEAD)
        if end < 0:
            return _NEED_MORE if len(data) < MAX_HEAD else None
        lines = data[:end].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in _METHODS:
            return None
        method, uri = parts[0], parts[1]
        if not _PLAIN_TARGET.fullmatch(uri):
            return None
        length = 0
        close = False
        seen = set()
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name) or not _PLAIN_VALUE.fullmatch(value):
                return None
            name = name.lower()
            if name in seen and name in (b"content-length", b"connection"):
                return None
            seen.add(name)
            value = value.strip(b" \t")
            if name == b"content-length":
                if not value.isdigit() or int(value) > MAX_BODY:
                    return None
                length = int(value)
            elif name == b"connection":
                close = b"close" in [token.lower() for token in value.split(b" ")]
            elif name in _NOT_HERE:
                return None
        if method == b"GET" and uri.rsplit(b"/", 1)[-1] in _STREAMED:
            return None
        start = end + 4
        if len(data) < start + length:
            if self.phase != BODY:  # as GuardedChannel: the body's own allowance from here
                self.phase = BODY
                self.since = self.guard.clock.seconds()
            self.body_received = len(data) - start
            return _NEED_MORE
        return method, uri, data[start : start + length], close, start + length

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        call = self._call
        if call is not None:
            call._disconnected = True
        super().connectionLost(reason)
