"""
The parts of WebSocket and event-stream routes that need no network: lines,
events, the bounded message buffers, the upgrade checks, and the two
streams driven by a fake request, process and clock.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest
from twisted.web.websocket import WebSocketResource  # noqa: F401  (the extra is installed)

from kapow.core.routes import Route
from kapow.streams.events import KEEP_ALIVE, OUTPUT_GRACE, EventStream, event_bytes
from kapow.streams.lines import Lines
from kapow.streams.websocket import ProcessWebSocket, _Bounded, upgrade_refusal


def test_lines_are_cut_at_their_ends_without_them() -> None:
    lines = Lines(longest=10)
    assert lines.feed(b"one\ntw") == [b"one"]
    assert lines.feed(b"o\r\n\nthree") == [b"two", b""]
    assert lines.rest() == b"three"
    assert lines.rest() is None


def test_a_line_longer_than_the_longest_is_cut_there() -> None:
    lines = Lines(longest=4)
    assert lines.feed(b"abcdefghij") == [b"abcd", b"efgh"]
    assert lines.feed(b"k\nlmnopq\n") == [b"ijk", b"lmno", b"pq"]


def test_event_lines() -> None:
    assert event_bytes(b"hello") == b"data: hello\n\n"
    assert event_bytes(b"") == b"data: \n\n"
    for field in (b"event: tick", b"id: 7", b"retry: 100"):
        assert event_bytes(field) == field + b"\n"
    assert event_bytes(b"eventually") == b"data: eventually\n\n"


def test_a_bounded_buffer_stops_at_its_limit() -> None:
    over: list[bool] = []
    buffer = _Bounded("", 4, lambda: over.append(True))
    buffer.add("ab")
    buffer.add("é")  # two bytes: four in all
    assert (buffer.done(), over) == ("abé", [])
    buffer.add("abc")
    buffer.add("de")
    buffer.add("more")
    assert over == [True]
    assert buffer.done() == ""
    buffer.add("ok")
    assert buffer.done() == "ok"


def test_twisteds_wire_protocol_still_has_the_buffers_we_bound() -> None:
    from twisted.web._websocket_impl import _WebSocketWireProtocol

    fields = _WebSocketWireProtocol.__dataclass_fields__
    assert "_textBuffer" in fields and "_bytesBuffer" in fields


def _upgrade(**headers: bytes) -> DummyRequest:
    request = DummyRequest([b"ws"])
    request.clientproto = b"HTTP/1.1"
    request.isSecure = lambda: False
    base = {
        b"host": b"example.test:8080",
        b"upgrade": b"websocket",
        b"connection": b"keep-alive, Upgrade",
        b"sec-websocket-version": b"13",
        b"sec-websocket-key": base64.b64encode(b"k" * 16),
    }
    for name, value in {**base, **{k.replace("_", "-").encode(): v for k, v in headers.items()}}.items():
        if value:
            request.requestHeaders.setRawHeaders(name, [value])
    return request


ROUTE = Route(id="r", method="GET", url_pattern="/ws", mode="websocket", origins=("https://app.test",))


def test_a_valid_upgrade_from_its_own_or_a_listed_origin_passes() -> None:
    assert upgrade_refusal(_upgrade(), ROUTE) is None
    assert upgrade_refusal(_upgrade(origin=b"http://example.test:8080"), ROUTE) is None
    assert upgrade_refusal(_upgrade(origin=b"https://app.test"), ROUTE) is None


@pytest.mark.parametrize(
    "headers",
    [
        {"upgrade": b""},
        {"upgrade": b"h2c"},
        {"connection": b"keep-alive"},
        {"sec_websocket_version": b"12"},
        {"sec_websocket_key": b"c2hvcnQ="},
        {"sec_websocket_key": b"not base64!"},
    ],
)
def test_an_invalid_upgrade_is_426(headers: dict[str, bytes]) -> None:
    refusal = upgrade_refusal(_upgrade(**headers), ROUTE)
    assert refusal is not None
    assert refusal[0] == 426
    assert (b"Upgrade", b"websocket") in refusal[2]


def test_http2_and_other_methods_are_426() -> None:
    request = _upgrade()
    request.clientproto = b"HTTP/2"
    assert upgrade_refusal(request, ROUTE)[0] == 426  # type: ignore[index]
    request = _upgrade()
    request.method = b"HEAD"
    assert upgrade_refusal(request, ROUTE)[0] == 426  # type: ignore[index]


def test_a_foreign_origin_is_403() -> None:
    assert upgrade_refusal(_upgrade(origin=b"https://example.test:8080"), ROUTE)[0] == 403  # type: ignore[index]
    assert upgrade_refusal(_upgrade(origin=b"null"), ROUTE)[0] == 403  # type: ignore[index]


def _request() -> DummyRequest:
    """A request as the streams see it (twisted.web's own marks included)."""
    request = DummyRequest([b"e"])
    request._disconnected = False
    request.startedWriting = True
    request.producers = []
    # DummyRequest pulls from a registered producer until it is unregistered
    request.registerProducer = lambda producer, streaming: request.producers.append(producer)
    request.unregisterProducer = lambda: None
    return request


class FakeProcess:
    def __init__(self) -> None:
        self.paused = False
        self.stdin: list[bytes] = []
        self.stdin_closed = False
        self.producer: Any = None
        self.aborted = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def writeToChild(self, fd: int, data: bytes) -> None:
        assert fd == 0
        self.stdin.append(data)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def abortConnection(self) -> None:  # as the connection's transport
        self.aborted = True


def test_an_event_stream_starts_with_its_process_and_ends_after_its_output() -> None:
    clock = Clock()
    request = _request()
    stream = EventStream(request, heartbeat=5, clock=clock, longest=1024)  # type: ignore[arg-type]
    process = FakeProcess()
    stream.process_started(process)  # type: ignore[arg-type]
    assert request.responseCode == 200
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/event-stream"]
    stream.output(b"one\ntw")
    clock.advance(4)
    stream.output(b"o\n")
    clock.advance(4)  # 4 s since the last event: no keep-alive yet
    assert b"".join(request.written) == b"data: one\n\ndata: two\n\n"
    clock.advance(1)
    assert request.written[-1] == KEEP_ALIVE
    stream.process_exited(failed=True)
    assert not request.finished  # its output may still come
    stream.output(b"last")
    stream.output_ended()
    assert request.written[-1] == b"data: last\n\n"
    assert request.finished
    clock.advance(60)
    assert request.written[-1] == b"data: last\n\n"


def test_an_event_stream_ends_a_grace_after_the_exit_if_its_output_stays_open() -> None:
    clock = Clock()
    request = _request()
    stream = EventStream(request, heartbeat=0, clock=clock, longest=1024)  # type: ignore[arg-type]
    stream.process_started(FakeProcess())  # type: ignore[arg-type]
    stream.process_exited(failed=False)
    clock.advance(OUTPUT_GRACE - 0.01)
    assert not request.finished
    clock.advance(0.02)
    assert request.finished
    assert clock.getDelayedCalls() == []


class FakeWire:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []
        self.closed: int | None = None

    def sendTextMessage(self, text: str) -> None:
        self.sent.append(("text", text))

    def sendBytesMessage(self, data: bytes) -> None:
        self.sent.append(("bytes", data))

    def ping(self, payload: bytes = b"") -> None:
        self.sent.append(("ping", payload))

    def loseConnection(self, code: int = 1000, reason: str = "") -> None:
        self.closed = code


def _websocket(
    clock: Clock, binary: bool = False, ping: float = 0
) -> tuple[ProcessWebSocket, FakeWire, FakeProcess]:
    request = _request()
    socket = FakeProcess()  # pauses as a transport does
    request.channel = type("Channel", (), {"transport": socket})()
    counts: list[str] = []
    stream = ProcessWebSocket(request, clock, binary=binary, max_message=8, ping=ping, counted=counts.append)  # type: ignore[arg-type]
    wire = FakeWire()
    stream.negotiationStarted(wire)  # type: ignore[arg-type]
    stream.negotiationFinished()
    assert socket.paused  # nothing is read before a process can take it
    process = FakeProcess()
    stream.textMessageReceived("early")
    stream.process_started(process)  # type: ignore[arg-type]
    assert not socket.paused
    return stream, wire, process


def test_a_websocket_joins_lines_to_the_process() -> None:
    clock = Clock()
    stream, wire, process = _websocket(clock)
    stream.bytesMessageReceived(b"two")
    assert process.stdin == [b"early\n", b"two\n"]
    stream.output(b"out\n\xff\nlong line!\npart")
    assert wire.sent == [("text", "out"), ("bytes", b"\xff"), ("text", "long lin"), ("text", "e!")]
    stream.process_exited(failed=False)
    stream.output_ended()
    assert wire.sent[-1] == ("text", "part")
    assert wire.closed == 1000


def test_a_failed_process_closes_with_1011_after_the_grace() -> None:
    clock = Clock()
    stream, wire, _ = _websocket(clock)
    stream.process_exited(failed=True)
    assert wire.closed is None
    clock.advance(OUTPUT_GRACE)
    assert wire.closed == 1011


def test_binary_websocket_messages_are_the_bytes() -> None:
    stream, wire, process = _websocket(Clock(), binary=True)
    stream.bytesMessageReceived(b"\x00\n")
    assert process.stdin[-1] == b"\x00\n"
    stream.output(b"a\nb")
    assert wire.sent == [("bytes", b"a\nb")]


def test_a_missing_pong_closes_the_websocket() -> None:
    clock = Clock()
    stream, wire, _ = _websocket(clock, ping=2)
    clock.advance(2)
    assert wire.sent == [("ping", b"kapow")]
    stream.pongReceived(b"kapow")
    clock.advance(2)
    assert wire.closed is None
    clock.advance(2)
    assert wire.closed == 1008
    assert stream.request.channel.transport.aborted  # it does not read: nothing waits to be flushed


def test_a_lost_websocket_closes_stdin_and_stops_pinging() -> None:
    clock = Clock()
    stream, wire, process = _websocket(clock, ping=2)
    stream.connectionLost(None)  # type: ignore[arg-type]
    assert process.stdin_closed
    assert clock.getDelayedCalls() == []
    stream.output(b"dropped\n")
    assert wire.sent == []
