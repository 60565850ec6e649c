"""
The corrections of kapow.web.http2 to Twisted's HTTP/2 connection, in
memory: real TLS with ALPN h2 between two TLSMemoryBIOProtocols, a fake
clock, and raw frames.

Each correction has two kinds of test. One shows that Twisted (or h2) as
installed still gets it wrong, so the correction is still needed: when a
future version fixes it, that test fails and the correction can go. The
other shows ours gets it right. ``test_what_the_corrections_rely_on``
fails when a future version renames what they use.
"""

from __future__ import annotations

import inspect
import struct
from collections.abc import Callable
from typing import Any

import h2.connection
import pytest
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, ProtocolError
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web import http
from twisted.web._http2 import H2Connection
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from kapow.web.connections import Timeouts, guarded_protocol
from kapow.web.http2 import ConformingH2Connection, _H2State
from kapow.web.tls import user_server_options
from tests.support.pki import PKI, make_pki

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
#: HPACK for GET https://localhost/ (static table entries and a literal).
REQUEST_BLOCK = b"\x82\x87\x84\x41\x09localhost"


def frame(kind: int, flags: int = 0, stream: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of each whole frame in ``data``."""
    found = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        found.append((data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF, data[9 : 9 + length]))
        data = data[9 + length :]
    return found


def goaway_codes(data: bytes) -> list[int]:
    return [int.from_bytes(payload[4:8], "big") for kind, _, _, payload in frames(data) if kind == GOAWAY]


def request(stream: int = 1, path: bytes = b"/") -> bytes:
    block = b"\x82\x87\x04" + bytes([len(path)]) + path + b"\x41\x09localhost"
    return frame(HEADERS, END_STREAM | END_HEADERS, stream, block)


# -- h2's error codes -------------------------------------------------------------------


def opened(kind: type[h2.connection.H2Connection]) -> h2.connection.H2Connection:
    """A server-side h2 connection past the client's preface and SETTINGS."""
    connection = kind(config=H2Configuration(client_side=False, header_encoding=None))
    connection.initiate_connection()
    connection.receive_data(PREFACE + frame(SETTINGS))
    connection.data_to_send()
    return connection


def code_for(kind: type[h2.connection.H2Connection], data: bytes) -> int:
    """The code of the GOAWAY ``kind`` answers ``data`` with."""
    connection = opened(kind)
    with pytest.raises(ProtocolError):
        connection.receive_data(data)
    [code] = goaway_codes(connection.data_to_send())
    return code


BAD_HEADER_BLOCKS = {
    "h2spec http2/4.3/1: a literal cut short": b"\x40",
    "h2spec hpack/2.3.3/1: an index past both tables": b"\x82\x87\x84\xbe",
    "h2spec hpack/6.1/1: index 0": b"\x80",
    "h2spec hpack/4.2/1: a table size update at the end": REQUEST_BLOCK + b"\x20",
    "h2spec hpack/6.3/1: a table size update to 4097": b"\x3f\xe2\x1f" + REQUEST_BLOCK,
    "h2spec hpack/5.2/3: a Huffman string holding EOS": b"\x82\x87\x84\x41\x85\xff\xff\xff\xff\xff",
}


@pytest.mark.parametrize("block", BAD_HEADER_BLOCKS.values(), ids=BAD_HEADER_BLOCKS.keys())
def test_a_header_block_that_does_not_decode_is_a_compression_error(block: bytes) -> None:
    bad = frame(HEADERS, END_STREAM | END_HEADERS, 1, block)
    assert code_for(h2.connection.H2Connection, bad) == ErrorCodes.PROTOCOL_ERROR  # h2 still says so
    assert code_for(_H2State, bad) == ErrorCodes.COMPRESSION_ERROR


def test_a_settings_ack_with_a_payload_is_a_frame_size_error() -> None:
    bad = frame(SETTINGS, ACK, 0, b"\x00")  # h2spec http2/6.5/1
    assert code_for(h2.connection.H2Connection, bad) == ErrorCodes.PROTOCOL_ERROR  # h2 still says so
    assert code_for(_H2State, bad) == ErrorCodes.FRAME_SIZE_ERROR


def test_other_protocol_errors_keep_their_codes() -> None:
    # a zero WINDOW_UPDATE is hyperframe's InvalidDataError too, but not a SETTINGS ACK
    assert code_for(_H2State, frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0")) == ErrorCodes.PROTOCOL_ERROR
    assert code_for(_H2State, frame(SETTINGS, 0, 0, b"\0\0\0")) == ErrorCodes.FRAME_SIZE_ERROR  # h2's own
    assert code_for(_H2State, frame(PING, 0, 1, bytes(8))) == ErrorCodes.PROTOCOL_ERROR  # PING on a stream
    # a header block past our limit stays h2's ENHANCE_YOUR_CALM, not a compression error
    connection = opened(_H2State)
    connection.decoder.max_header_list_size = 10
    with pytest.raises(ProtocolError):
        connection.receive_data(request())
    assert goaway_codes(connection.data_to_send()) == [ErrorCodes.ENHANCE_YOUR_CALM]


def test_a_ping_after_the_peers_goaway_is_no_protocol_error() -> None:
    # h2spec generic/3.8/1 and http2/7/1 send both at once; RFC 9113 §6.8 lets the peer send the PING
    both = frame(GOAWAY, 0, 0, bytes(8)) + frame(PING, 0, 0, b"h2spec\0\0")
    assert code_for(h2.connection.H2Connection, both) == ErrorCodes.PROTOCOL_ERROR  # h2 still says so
    assert code_for(_H2State, both) == ErrorCodes.NO_ERROR


# -- a negative send window ---------------------------------------------------------------


class Body(Resource):
    """``/hold`` waits for the test; any other path answers ``size`` bytes."""

    isLeaf = True

    def __init__(self, size: int = 2) -> None:
        super().__init__()
        self.size = size
        self.held: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/hold":
            self.held.append(request)
            return NOT_DONE_YET
        return b"x" * self.size


def window_made_negative(kind: Callable[[Clock], H2Connection]) -> tuple[H2Connection, StringTransport]:
    """
    h2spec http2/6.9.2/2 in memory: the client's window of 5 bytes is used
    up, 5 more bytes wait, and a SETTINGS frame takes the window to -3.
    """
    clock = Clock()
    site = Site(Body(size=10), reactor=clock)
    connection = kind(clock)
    connection.site, connection.factory, connection.requestFactory = site, site, site.requestFactory
    connection.callLater = clock.callLater
    transport = StringTransport()
    connection.makeConnection(transport)
    window = struct.pack(">HI", 0x4, 5)  # SETTINGS_INITIAL_WINDOW_SIZE
    connection.dataReceived(PREFACE + frame(SETTINGS, 0, 0, window) + request())
    # one turn of the send loop, by hand: the clock would run it again at
    # once for as long as the window stays shut (it waits by polling)
    connection._sendPrioritisedData()
    sent = [(kind, len(payload)) for kind, _, _, payload in frames(transport.value())]
    assert (DATA, 5) in sent
    connection.dataReceived(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 2)))
    assert connection.conn.outbound_flow_control_window >= 0
    assert connection.conn._get_stream_by_id(1).outbound_flow_control_window == -3
    transport.clear()
    return connection, transport


def test_a_negative_window_no_longer_kills_the_send_loop() -> None:
    connection, _ = window_made_negative(H2Connection)
    with pytest.raises(FlowControlError):  # Twisted still cuts at a negative index
        connection._sendPrioritisedData()
    connection, transport = window_made_negative(ConformingH2Connection)
    connection._sendPrioritisedData()  # sends nothing while the window is shut
    assert not [kind for kind, *_ in frames(transport.value()) if kind == DATA]
    # a WINDOW_UPDATE of 4 opens it by 1 byte: one byte goes (h2spec's expectation)
    connection.dataReceived(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 4)))
    connection._sendPrioritisedData()
    assert [payload for kind, _, _, payload in frames(transport.value()) if kind == DATA] == [b"x"]


# -- closing: the whole stack, over TLS ----------------------------------------------------------


class Client(Protocol):
    """The client's end of one connection: what the server sent, and whether it closed."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True


@implementer(IPushProducer, IConsumer)
class Socket(iosim.FakeTransport):
    """
    iosim's transport, declaring what a TCP transport provides: TLS passes
    it on, and twisted.web registers its channel as producer only with a
    transport that is one (``HTTPChannel._networkProducer``).
    """


class Link:
    """One client connection to ``site`` over TLS with ALPN h2, pumped by hand."""

    def __init__(self, site: Site, pki: PKI, clock: Clock) -> None:
        self.clock = clock
        server_tls = TLSMemoryBIOFactory(
            user_server_options(str(pki.server_chain), str(pki.server_key)), False, site, clock
        ).buildProtocol(None)
        trust = Certificate.loadPEM(pki.ca.read_bytes())
        client_options = optionsForClientTLS("localhost", trustRoot=trust, acceptableProtocols=[b"h2"])
        self.client = Client()
        client_tls = TLSMemoryBIOFactory(
            client_options, True, Factory.forProtocol(lambda: self.client), clock
        )
        client_side = client_tls.buildProtocol(None)
        self.pump = iosim.connect(
            server_tls,
            Socket(server_tls, True),
            client_side,
            Socket(client_side, False),
            clock=clock,
        )
        self.server = server_tls
        self.send(PREFACE + frame(SETTINGS))
        assert server_tls.negotiatedProtocol == b"h2"

    def send(self, data: bytes) -> None:
        assert self.client.transport is not None
        self.client.transport.write(data)
        self.pump.flush()

    def codes(self) -> list[int]:
        return goaway_codes(self.client.received)


def plain_twisted_protocol() -> Any:
    """twisted.web's own protocol for a Site: its negotiation and its H2Connection."""
    return http._genericHTTPChannelProtocolFactory(None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def sites(resource: Resource, clock: Clock, idle: float = 60) -> dict[str, Site]:
    ours = Site(resource, reactor=clock)
    ours.protocol = guarded_protocol(Timeouts(header=10, idle=idle, body_rate=100), clock)
    plain = Site(resource, reactor=clock, timeout=idle)
    plain.protocol = plain_twisted_protocol
    return {"ours": ours, "plain": plain}


CLOSING_INPUT = {
    "h2spec generic/3.8/1: the client's GOAWAY": frame(GOAWAY, 0, 0, bytes(8)),
    "h2spec http2/5.4.1/1: a PING of 3 bytes": frame(PING, 0, 0, b"\0\0\0"),
    "h2spec hpack/6.1/1: index 0": frame(HEADERS, END_STREAM | END_HEADERS, 1, b"\x80"),
    "h2spec http2/6.5/1: a SETTINGS ACK with a payload": frame(SETTINGS, ACK, 0, b"\x00"),
}


@pytest.mark.parametrize("data", CLOSING_INPUT.values(), ids=CLOSING_INPUT.keys())
def test_the_connection_closes_when_the_protocol_ends_it(pki: PKI, data: bytes) -> None:
    clock = Clock()
    links = {name: Link(site, pki, clock) for name, site in sites(Body(), clock).items()}
    for link in links.values():
        link.send(data)
    # Twisted still leaves its H2Connection registered as the TLS transport's
    # producer, so the transport never closes
    assert not links["plain"].client.closed
    assert links["plain"].server._producer is not None
    assert links["ours"].client.closed
    assert links["ours"].server._producer is None
    if data[3] == GOAWAY:
        assert links["ours"].codes() == []  # the peer ends it: no GOAWAY back
    else:
        assert len(links["ours"].codes()) == 1


def test_the_right_code_reaches_the_client_before_the_close(pki: PKI) -> None:
    clock = Clock()
    for data, code in (
        (CLOSING_INPUT["h2spec hpack/6.1/1: index 0"], ErrorCodes.COMPRESSION_ERROR),
        (CLOSING_INPUT["h2spec http2/6.5/1: a SETTINGS ACK with a payload"], ErrorCodes.FRAME_SIZE_ERROR),
        (CLOSING_INPUT["h2spec http2/5.4.1/1: a PING of 3 bytes"], ErrorCodes.FRAME_SIZE_ERROR),
        (frame(GOAWAY, 0, 0, bytes(8)) + frame(PING, 0, 0, bytes(8)), ErrorCodes.NO_ERROR),
    ):
        link = Link(sites(Body(), clock)["ours"], pki, clock)
        link.send(data)
        assert link.codes() == [code] and link.client.closed


def test_an_idle_connection_closes_after_its_goaway_not_15_seconds_later(pki: PKI) -> None:
    clock = Clock()
    links = {name: Link(site, pki, clock) for name, site in sites(Body(), clock, idle=5).items()}
    clock.advance(6)
    for link in links.values():
        link.pump.flush()
        assert link.codes() == [ErrorCodes.NO_ERROR]
    assert links["ours"].client.closed
    assert not links["plain"].client.closed  # Twisted waits for its abortTimeout
    clock.advance(H2Connection.abortTimeout)
    links["plain"].pump.flush()
    assert links["plain"].client.closed


def test_a_client_that_does_not_close_after_the_goaway_is_cut_off_a_second_later() -> None:
    # RFC 9113 §5.4.1: the server closes the TCP connection; Twisted's TLS
    # transport would wait for the client's close_notify until the idle timeout
    clock = Clock()
    connection = ConformingH2Connection(clock)
    connection.callLater = clock.callLater
    transport = StringTransport()
    connection.makeConnection(transport)
    transport.registerProducer(connection, True)
    connection.produces_for(transport)
    connection.dataReceived(PREFACE + frame(SETTINGS) + frame(HEADERS, END_STREAM | END_HEADERS, 1, b"\x80"))
    assert goaway_codes(transport.value()) == [ErrorCodes.COMPRESSION_ERROR]
    assert transport.producer is None and transport.disconnecting
    clock.advance(ConformingH2Connection.closeTimeout - 0.1)
    assert not transport.disconnected
    clock.advance(0.2)
    assert transport.disconnected  # aborted


def test_a_bad_frame_ends_only_its_own_connection(pki: PKI) -> None:
    clock = Clock()
    resource = Body()
    site = sites(resource, clock)["ours"]
    waiting, bad, later = (Link(site, pki, clock) for _ in range(3))
    waiting.send(request(path=b"/hold"))
    assert len(resource.held) == 1
    bad.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, b"\x80"))
    assert bad.client.closed and bad.codes() == [ErrorCodes.COMPRESSION_ERROR]
    later.send(request(path=b"/now"))
    held = resource.held.pop()
    held.write(b"still here")
    held.finish()
    for link, body in ((waiting, b"still here"), (later, b"xx")):
        link.pump.flush()
        data = b"".join(payload for kind, _, stream, payload in frames(link.client.received) if kind == DATA)
        assert data == body and not link.client.closed and link.codes() == []


def test_a_request_over_h2_is_served_by_our_connection(pki: PKI) -> None:
    clock = Clock()
    link = Link(sites(Body(size=100_000), clock)["ours"], pki, clock)
    protocol = link.server.wrappedProtocol
    assert isinstance(protocol._channel, ConformingH2Connection)
    # a body larger than the default window, in windows opened beforehand
    # (a window that closes makes Twisted's send loop poll: the clock would run it for ever)
    link.send(
        frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 1 << 20))
        + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20))
        + request()
    )
    received = frames(link.client.received)
    assert (
        sum(len(payload) for kind, _, stream, payload in received if kind == DATA and stream == 1) == 100_000
    )
    assert any(kind == DATA and flags & END_STREAM for kind, flags, _, _ in received)
    assert not link.client.closed


# -- the names the corrections rely on ----------------------------------------------------


def test_what_the_corrections_rely_on() -> None:
    """Fails when Twisted or h2 renames what kapow.web.http2 and the negotiation use."""
    # twisted.web's negotiation still builds its own class by name: ours repeats the switch
    switch = inspect.getsource(http._GenericHTTPChannelProtocol.dataReceived)
    assert "H2Connection()" in switch and "_networkProducer" in switch and "registerProducer" in switch
    for name in ("_negotiatedProtocol", "_requestFactory", "_site", "_factory", "_timeOut", "_callLater"):
        assert hasattr(http._GenericHTTPChannelProtocol, name), name
    assert "_networkProducer" in inspect.getsource(http.HTTPChannel.connectionMade)
    # H2Connection: the teardown flag, the buffered control frames, the send loop's window
    assert "_cancelTimeouts" in inspect.signature(H2Connection.connectionLost).parameters
    connection = H2Connection(Clock())
    assert connection._bufferedControlFrames is not None and connection._bufferedControlFrameBytes == 0
    assert "self.conn.local_flow_control_window(stream)" in inspect.getsource(
        H2Connection._sendPrioritisedData
    )
    assert "self.transport.loseConnection()" in inspect.getsource(H2Connection.timeoutConnection)
    # h2: where the GOAWAY's code comes from, and what a GOAWAY received goes through
    receive = inspect.getsource(h2.connection.H2Connection.receive_data)
    assert "self._terminate_connection(e.error_code)" in receive
    assert hasattr(h2.connection.H2Connection, "_receive_goaway_frame")
    state = opened(_H2State)
    assert isinstance(state.incoming_buffer._data, bytearray)
