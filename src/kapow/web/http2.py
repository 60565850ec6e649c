"""
Twisted's HTTP/2 server connection, corrected where the HTTP/2 conformance
suite (h2spec) finds it wrong: :class:`ConformingH2Connection` is
``twisted.web._http2.H2Connection`` (on h2 and hpack) with the fewest
overrides that make the HTTPS user interface pass all 146 h2spec cases. The
negotiation in :mod:`kapow.web.connections` builds it where twisted.web would
build its own; Twisted's modules are not patched.

Each correction names the h2spec cases it answers and the Twisted or h2
code it works around. ``tests/unit/test_http2_corrections.py`` fails when a
future Twisted or h2 fixes one of them (the correction can go) or renames
what a correction relies on.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import h2.connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from hpack.exceptions import HPACKError
from hyperframe.exceptions import InvalidDataError
from twisted.internet.protocol import connectionDone
from twisted.web._http2 import H2Connection

if TYPE_CHECKING:
    from h2.events import Event
    from hyperframe.frame import Frame, GoAwayFrame
    from twisted.internet.interfaces import IConsumer, IReactorTime
    from twisted.python.failure import Failure

__all__ = ["ConformingH2Connection"]

#: A frame header's type and flags octets: SETTINGS, and its ACK flag.
_SETTINGS, _ACK = 0x4, 0x1


class _H2State(h2.connection.H2Connection):
    """h2's connection state machine, with the error codes RFC 9113 asks for and no negative send window."""

    def local_flow_control_window(self, stream_id: int) -> int:
        """
        The bytes that may be sent on ``stream_id`` now: never less than 0.

        h2spec http2/6.9.2/2 (a SETTINGS frame that makes the window
        negative, RFC 9113 §6.9.2). h2 returns the window as it stands, which a
        smaller ``SETTINGS_INITIAL_WINDOW_SIZE`` makes negative; Twisted's send
        loop (``H2Connection._sendPrioritisedData``) then cuts a frame at
        ``frameData[:min(max_outbound_frame_size, window)]``, a negative
        index, sends the slice, and h2 refuses it with a ``FlowControlError``
        nothing catches: the loop dies and the connection's responses stall.
        At 0 the loop sends nothing, and tries again each turn of the reactor
        (as Twisted does for any window the peer keeps shut) until a
        WINDOW_UPDATE opens it.
        """
        return max(0, super().local_flow_control_window(stream_id))

    #: Whether the peer sent GOAWAY: see :meth:`_terminate_connection`.
    peer_went_away = False

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        # noted for _terminate_connection: h2 closes its state machine here,
        # and refuses every frame after as a protocol error
        self.peer_went_away = True
        return super()._receive_goaway_frame(frame)

    def _terminate_connection(self, error_code: ErrorCodes) -> None:
        """
        Queue the GOAWAY that ends the connection, with the code the frame at
        fault calls for.

        h2's ``receive_data`` calls this from ``except ProtocolError as e``
        with ``e.error_code``, and for three kinds of input that code is
        PROTOCOL_ERROR where RFC 9113 asks for another; the exception being
        handled (``sys.exc_info``) still says which:

        * a frame after the peer's GOAWAY, a PING say, which the peer may
          send (RFC 9113 §6.8) but h2 refuses, its connection being closed:
          NO_ERROR, as the peer ends the connection (h2spec generic/3.8/1 and
          http2/7/1 when the GOAWAY and the PING arrive in one read);
        * a header block hpack cannot decode (h2's ``_decode_headers`` turns
          every ``HPACKError`` into a plain ``ProtocolError``): COMPRESSION_ERROR
          (RFC 9113 §4.3). h2spec http2/4.3/1, hpack/2.3.3/1-2, hpack/4.2/1,
          hpack/5.2/1-3, hpack/6.1/1, hpack/6.3/1;
        * a SETTINGS frame with the ACK flag and a payload (hyperframe's
          ``InvalidDataError``, which h2's ``FrameBuffer`` turns into a
          plain ``ProtocolError``; the frame is still first in the buffer):
          FRAME_SIZE_ERROR (RFC 9113 §6.5). h2spec http2/6.5/1.

        A header block too large for our limits stays h2's
        ``DenialOfServiceError`` (ENHANCE_YOUR_CALM).
        """
        error = sys.exc_info()[1]
        if error_code == ErrorCodes.PROTOCOL_ERROR and type(error) is ProtocolError:
            cause = error.__cause__
            if self.peer_went_away:
                error_code = ErrorCodes.NO_ERROR
            elif isinstance(cause, HPACKError):
                error_code = ErrorCodes.COMPRESSION_ERROR
            elif isinstance(cause, InvalidDataError):
                header = self.incoming_buffer._data[:9]
                if len(header) == 9 and header[3] == _SETTINGS and header[4] & _ACK:
                    error_code = ErrorCodes.FRAME_SIZE_ERROR
        super()._terminate_connection(error_code)


class ConformingH2Connection(H2Connection):
    """
    twisted.web's HTTP/2 connection that really closes when the protocol
    says the connection ends, and that sends each connection error with the
    code RFC 9113 gives it (through :class:`_H2State`).

    The negotiation registers it as its TLS transport's producer, as
    twisted.web does, and tells it so (:meth:`produces_for`).

    :param reactor: the reactor (its time and ``callLater``).
    """

    #: Seconds a connection the protocol ended (a connection error, the
    #: client's GOAWAY) is left for the client to close, before it is aborted.
    closeTimeout = 1.0

    def __init__(self, reactor: IReactorTime | None = None) -> None:
        super().__init__(reactor)
        self.conn = _H2State(config=self.conn.config)
        self._consumer: IConsumer | None = None

    def produces_for(self, consumer: IConsumer) -> None:
        """The transport this connection was registered with as producer."""
        self._consumer = consumer

    def connectionLost(self, reason: Failure = connectionDone, _cancelTimeouts: bool = True) -> None:
        """
        When Twisted ends the connection itself (a client's GOAWAY, a
        protocol error, too many resets: ``_cancelTimeouts=False``, just after
        its ``transport.loseConnection()``), let the transport close.

        h2spec generic/3.8/1, http2/3.5/2, http2/5.4.1/1, http2/7/1, and
        every connection error after its GOAWAY (the COMPRESSION_ERROR and
        FRAME_SIZE_ERROR cases of :class:`_H2State`). Twisted's
        ``_GenericHTTPChannelProtocol`` registers the ``H2Connection`` as
        the TLS transport's producer and nothing unregisters it; the TLS
        transport (``TLSMemoryBIOProtocol.loseConnection``) holds a
        connection with a producer open, sending no close_notify, so the
        connection stayed open until the idle timeout, and answered a PING
        after a client's GOAWAY with a GOAWAY(PROTOCOL_ERROR).
        """
        super().connectionLost(reason, _cancelTimeouts)
        if not _cancelTimeouts:
            self._let_go()

    def timeoutConnection(self) -> None:
        """
        Idle: GOAWAY, then close at once.

        The same registered producer kept ``H2Connection.timeoutConnection``'s
        ``loseConnection()`` from closing: the connection stayed open another
        ``abortTimeout`` (15 s) until ``forceAbortClient`` aborted it.
        """
        super().timeoutConnection()
        self._let_go()

    def _let_go(self) -> None:
        """
        Write what is still held (the GOAWAY, or control frames buffered
        while the transport was paused), then unregister from the transport,
        which then sends close_notify; abort the connection if the client has
        not closed it :attr:`closeTimeout` seconds later.

        RFC 9113 §5.4.1: after the GOAWAY of a connection error the server
        MUST close the TCP connection; Twisted's TLS transport waits for the
        client's close_notify first, which a client need not send (the
        reference, Go's HTTP/2 server, closes 1 s after its GOAWAY). The idle
        timeout keeps Twisted's ``abortTimeout``.
        """
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        transport = self.transport
        assert transport is not None  # registered with it
        held = [*self._bufferedControlFrames, self.conn.data_to_send()]
        self._bufferedControlFrames.clear()
        self._bufferedControlFrameBytes = 0
        if any(held):
            for data in held:
                transport.write(data)
            # again: Twisted's TLS transport sends buffered small writes on
            # loseConnection (and would drop them once unregistered)
            transport.loseConnection()
        consumer.unregisterProducer()
        if self._abortingCall is None:
            self._abortingCall = self.callLater(self.closeTimeout, self.forceAbortClient)
