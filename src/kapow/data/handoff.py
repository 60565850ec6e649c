# -*- test-case-name: tests.e2e.test_data_handoff -*-
"""
The data API of ``--data-bind`` with ``--workers N``. Every handler lives in
a worker, whose data API answers for it; the main process accepts each
connection to ``--data-bind``, reads its request line without taking it
from the socket (``MSG_PEEK``), and hands the connection itself to the
worker that the handler id in the path names (any worker for a path that
names none: it answers as the data API does), over a socket of their own
that carries descriptors (:func:`sender`, :class:`HandedConnections`). The
worker serves the request as if it had accepted the connection, then closes
it: a next request on the same connection might be for another worker's
handler, and the clients of the data API open a new one when told to
(``Connection: close``).

No byte of a call passes through the main process, and nothing waits for
an answer from the worker: the kernel holds the connection in the message
until the worker takes it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from functools import partial

from twisted.application.service import Service
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorFDSet,
    IReactorSocket,
    IReactorTime,
    IReadDescriptor,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.tcp import Server
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import implementer

from kapow.web.connections import GuardedChannel, Timeouts, is_loopback
from kapow.web.errors import closing_answer

__all__ = [
    "HandOff",
    "HandOffFactory",
    "HandedConnections",
    "IHandOffReactor",
    "Taker",
    "adopter",
    "handler_id_in",
    "sender",
]

log = Logger()

#: Hands a connection (its descriptor, its address family) to a worker;
#: ``False`` if it could not.
Taker = Callable[[int, int], bool]

#: The most bytes of a request read for its request line: a longer line goes
#: to any worker, whose data API refuses it as it refuses one sent to it.
LINE_MOST = 16_384
#: Seconds before a request line that came in part is looked at again.
LOOK_AGAIN = 0.002


_NOT_FOUND = closing_answer(404, "Handler ID Not Found")
_UNAVAILABLE = closing_answer(503, "Service Unavailable")


def handler_id_in(line: bytes) -> str:
    """The handler id a data API request line names (``""``: none)."""
    parts = line.split(b" ")
    if len(parts) < 2:
        return ""
    segments = parts[1].split(b"?", 1)[0].split(b"/", 3)
    if len(segments) > 2 and segments[0] == b"" and segments[1] == b"handlers":
        return segments[2].decode("latin-1")
    return ""


@implementer(IReadDescriptor)
class _Readable:
    """
    The reactor's reader of a connection's socket while its request line is
    awaited: ``ready`` when it is readable, ``lost`` if the reactor gives it
    up (an error of the socket, a failure of ``ready``, the reactor's stop).
    """

    def __init__(self, fd: int, ready: Callable[[], None], lost: Callable[[], None]) -> None:
        self._fd = fd
        self._ready = ready
        self._lost = lost

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        self._ready()

    def connectionLost(self, reason: Failure) -> None:
        self._lost()

    def logPrefix(self) -> str:
        return "data-handoff"


class IHandOffReactor(IReactorFDSet, IReactorTime):
    """What a :class:`HandOff` needs of its reactor: to watch a socket, and a clock."""


class HandOff(Protocol):
    """
    One connection to ``--data-bind``, until its worker has it.

    :param choose: the :data:`Taker` of the worker serving a handler id
        (``""``: any worker), or ``None`` if there is none.
    :param reactor: watches the socket, keeps time.
    :param timeouts: the data API's: ``idle`` before a first byte (unless
        it spares loopback), ``header`` from the first byte to the end of the
        request line.
    """

    transport: Server  # a TCP connection of a listening port

    def __init__(
        self, choose: Callable[[str], Taker | None], reactor: IHandOffReactor, timeouts: Timeouts
    ) -> None:
        self.choose = choose
        self.reactor = reactor
        self.timeouts = timeouts
        self._reader: _Readable | None = None
        self._timer: IDelayedCall | None = None
        self._look_again: IDelayedCall | None = None
        self._partial = False
        self._done = False

    def connectionMade(self) -> None:
        self.transport.stopReading()  # the request stays in the socket, for the worker
        self._reader = _Readable(self.transport.fileno(), self._look, self._close)
        self.reactor.addReader(self._reader)
        if self.timeouts.idle_on_loopback or not is_loopback(self.transport.getPeer()):
            self._timer = self.reactor.callLater(self.timeouts.idle, self._too_slow)

    def _look(self) -> None:
        try:
            head = self.transport.socket.recv(LINE_MOST, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self._close()
            return
        if not head:  # the client left before asking anything
            self._close()
            return
        end = head.find(b"\n")
        if end < 0 and len(head) < LINE_MOST:
            self._unwatch()  # readable until the rest comes: look again shortly
            if not self._partial:
                self._partial = True
                self._cancel_timer()
                self._timer = self.reactor.callLater(self.timeouts.header, self._too_slow)
            self._look_again = self.reactor.callLater(LOOK_AGAIN, self._watch)
            return
        self._unwatch()
        self._cancel_timer()
        self._hand(handler_id_in(head[:end] if end >= 0 else b""))

    def _hand(self, handler_id: str) -> None:
        self._done = True
        take = self.choose(handler_id)
        transport = self.transport
        if take is None:  # its worker is gone, and the handler with it
            self._answer(_NOT_FOUND)
        elif take(transport.fileno(), transport.socket.family):
            self._close()  # the message holds it now, then the worker
        else:
            log.info("data API call not handed to its worker: it takes no more connections for now")
            self._answer(_UNAVAILABLE)

    def _answer(self, answer: bytes) -> None:
        transport = self.transport
        try:  # what the client sent is read, so that closing does not reset the connection
            transport.socket.recv(LINE_MOST)
        except OSError:
            pass
        transport.write(answer)
        transport.loseConnection()

    def _close(self) -> None:
        """Close this process's copy of the socket: a worker's copy, if it took one, stays open."""
        self._unwatch()
        self._cancel_timer()
        self._done = True
        self.transport._shouldShutdown = False  # no shutdown(2): it would end the worker's copy too
        self.transport.loseConnection()

    def _too_slow(self) -> None:
        self._timer = None
        if not self._done:
            log.info("closing a data API connection whose request line did not come in time")
            self._close()

    def _watch(self) -> None:
        self._look_again = None
        if not self._done and self._reader is not None and self.transport.connected:
            self.reactor.addReader(self._reader)

    def _unwatch(self) -> None:
        if self._reader is not None:
            self.reactor.removeReader(self._reader)

    def _cancel_timer(self) -> None:
        for call in (self._timer, self._look_again):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._look_again = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._unwatch()
        self._reader = None
        self._cancel_timer()
        self._done = True


class HandOffFactory(ServerFactory):
    """Makes a :class:`HandOff` for each connection to ``--data-bind``; arguments as its."""

    noisy = False

    def __init__(
        self, choose: Callable[[str], Taker | None], reactor: IHandOffReactor, timeouts: Timeouts
    ) -> None:
        self._make = partial(HandOff, choose, reactor, timeouts)

    def buildProtocol(self, addr: IAddress | None) -> HandOff:
        return self._make()


class _OneRequest(ServerFactory):
    """The channels of ``site``, each serving one request and then closing."""

    noisy = False

    def __init__(self, site: Site) -> None:
        self.site = site

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        channel = self.site.buildProtocol(addr)
        if isinstance(channel, GuardedChannel):
            channel.one_request = True
        return channel


def adopter(reactor: IReactorSocket, site: Site) -> Callable[[int, int], None]:
    """
    A worker's taker of connections handed over: each is served by
    ``site`` (its data API, whose listener set its channels) for one request.
    The descriptor given stays the caller's to close.
    """
    factory = _OneRequest(site)

    def adopt(fd: int, family: int) -> None:
        reactor.adoptStreamConnection(fd, socket.AddressFamily(family), factory)

    return adopt


def sender(sock: socket.socket) -> Taker:
    """
    The main process's :data:`Taker` for one worker: sends each connection
    over ``sock`` (a non-blocking ``SOCK_SEQPACKET`` socket whose other end
    the worker's :class:`HandedConnections` reads), a message of its own.
    """

    def take(fd: int, family: int) -> bool:
        try:
            socket.send_fds(sock, [bytes([family])], [fd])
        except OSError:  # full (the worker lags far behind), or the worker is gone
            return False
        return True

    return take


@implementer(IReadDescriptor)
class HandedConnections(Service):
    """
    A worker's end of the socket that the main process hands connections
    to ``--data-bind`` over (:func:`sender`): each is served by ``adopt``
    (:func:`adopter`), and closed here once it has.

    :param reactor: reads the socket.
    :param fd: the socket's descriptor, owned from now on.
    :param adopt: serves a connection (its descriptor, its address family).
    """

    name = "data-handoff"

    sock: socket.socket | None = None

    def __init__(self, reactor: IReactorFDSet, fd: int, adopt: Callable[[int, int], None]) -> None:
        self.reactor = reactor
        self.fd = fd
        self.adopt = adopt

    def startService(self) -> None:
        super().startService()
        self.sock = socket.socket(fileno=self.fd)
        self.sock.setblocking(False)
        self.reactor.addReader(self)

    def stopService(self) -> None:
        super().stopService()
        if self.sock is not None:
            self.reactor.removeReader(self)
            self.sock.close()

    def fileno(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    def logPrefix(self) -> str:
        return "data-handoff"

    def doRead(self) -> None:
        assert self.sock is not None  # read while the service runs
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 1, 1)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data and not fds:  # the main process is gone
                self.reactor.removeReader(self)
                return
            for fd in fds:
                try:
                    if data:
                        self.adopt(fd, data[0])
                except Exception:
                    log.failure("a data API connection handed over could not be served")
                finally:
                    os.close(fd)  # the reactor keeps a copy of its own

    def connectionLost(self, reason: Failure) -> None:
        # while the service runs (its stop removes it first): connections to --data-bind stop coming
        log.warn(
            "the socket connections to --data-bind come over is lost: {why}", why=reason.getErrorMessage()
        )
