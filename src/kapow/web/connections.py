"""
What every listener does to hold up under abuse: bounded time for a
request's headers, for its body and for an idle keep-alive connection; a
bounded number of connections; the system's listen backlog; and the highest
open-files limit the process may have.

A request that has been received is never timed out here: while the
server works on it (a handler runs, a response streams) the connection is
not idle, whatever the time between writes.
"""

from __future__ import annotations

import functools
import ipaddress
import resource
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web import http
from zope.interface import implementer

from kapow.web.errors import closing_answer
from kapow.web.http2 import ConformingH2Connection

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

log = Logger()

#: Descriptors kept out of the connection limits' defaults (logs, pidfds,
#: listening sockets, the launcher, pipes).
RESERVED_FILES = 64

#: The phases of a guarded connection: waiting for a request, receiving its
#: headers, receiving its body, being handled.
IDLE, HEADERS, BODY, HANDLING = range(4)


def raise_open_files_limit() -> tuple[int, int]:
    """
    Raise the soft ``RLIMIT_NOFILE`` to the hard limit, as Go's runtime does.

    :return: (the limit now, the soft limit before).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return target, soft
    return soft, soft


def default_max_connections(open_files: int) -> int:
    """
    Connections each listener accepts at once when ``--max-connections`` is
    not given: a quarter of the open-files limit (after a reserve), so that
    the three listeners together leave room for the handlers' descriptors.
    """
    return max(16, (open_files - RESERVED_FILES) // 4)


def system_backlog() -> int:
    """The kernel's largest listen backlog (``net.core.somaxconn``), as Go's listeners use."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def with_backlog(description: str, backlog: int) -> str:
    """
    The endpoint ``description`` listening with ``backlog``, unless it names
    one itself; sockets handed over by systemd are already listening.
    """
    kind = description.split(":", 1)[0]
    if kind == "haproxy":
        return "haproxy:" + with_backlog(description[len("haproxy:") :], backlog)
    if kind not in ("tcp", "tcp6", "unix") or ":backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def is_loopback(address: IAddress) -> bool:
    """Whether a peer ``address`` is this machine (loopback IP, or a UNIX socket)."""
    host = getattr(address, "host", None)
    if host is None:
        return True  # a UNIX socket: only this machine reaches it
    return _loopback_host(host)


@functools.lru_cache(maxsize=256)
def _loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class Timeouts:
    """
    The time limits of one listener's connections.

    :param header: seconds from a request's first byte to the end of its
        headers.
    :param idle: seconds a keep-alive connection may wait for its next request.
    :param body_rate: bytes per second a request body must arrive at, on
        average, after an allowance of ``header`` seconds.
    :param idle_on_loopback: whether ``idle`` applies to peers on this
        machine too (the data API leaves it to them: ``kapow set`` keeps its
        connection between appends).
    """

    def __init__(self, header: float, idle: float, body_rate: float, idle_on_loopback: bool = True) -> None:
        self.header = header
        self.idle = idle
        self.body_rate = body_rate
        self.idle_on_loopback = idle_on_loopback


_TIMEOUT_RESPONSE = closing_answer(408, "Request Timeout")


class Guard:
    """
    Keeps one listener's connections within its :class:`Timeouts`.

    No timer per request or per read: each connection notes when its
    current phase began (idle, receiving headers, receiving a body, being
    handled), and one periodic check for the whole listener — every quarter
    of the shortest limit, at most every second, and only while connections
    are open — closes those past their limit.

    :param timeouts: the limits.
    :param clock: the reactor's time.
    """

    def __init__(self, timeouts: Timeouts, clock: IReactorTime) -> None:
        self.timeouts = timeouts
        self.clock = clock
        self.channels: set[GuardedChannel] = set()
        self.interval = max(0.05, min(1.0, timeouts.header / 4, timeouts.idle / 4))
        self._check: LoopingCall | None = None

    def opened(self, channel: GuardedChannel) -> None:
        self.channels.add(channel)
        if self._check is None:
            self._check = LoopingCall(self.check)
            self._check.clock = self.clock
            self._check.start(self.interval, now=False)

    def closed(self, channel: GuardedChannel) -> None:
        self.channels.discard(channel)

    def check(self) -> None:
        """Close every connection past its limit; stop checking once none is open."""
        if not self.channels:
            # stopped here rather than at the last close: connections that
            # come one after another do not start and stop the check each
            if self._check is not None:
                self._check.stop()
                self._check = None
            return
        now = self.clock.seconds()
        header, idle, rate = self.timeouts.header, self.timeouts.idle, self.timeouts.body_rate
        for channel in list(self.channels):
            phase, waited = channel.phase, now - channel.since
            if phase == IDLE:
                if waited > idle and channel.idle_applies:
                    channel.timed_out(answer=False)
            elif phase == HEADERS:
                if waited > header:
                    channel.timed_out(answer=True)
            elif phase == BODY and waited > header + channel.body_received / rate:
                log.info("closing a connection whose request body came too slowly")
                channel.timed_out(answer=True)


class GuardedChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel kept within its listener's :class:`Guard`: idle
    time between requests, header time from a request's first byte, body
    time while a body arrives, and nothing while a request is handled. A
    request too slow to arrive gets 408 and the connection closes.
    twisted.web's own timer (reset at every read, so a trickle never
    expires) is not used.

    :ivar guard: the listener's :class:`Guard`.
    """

    guard: Guard
    _host: IAddress | None = None
    _peer: IAddress | None = None
    phase = IDLE
    since = 0.0
    body_received = 0
    idle_applies = True
    _guarded = False
    #: whether it serves one request and then closes (a connection another
    #: process accepted and handed over: :mod:`kapow.data.handoff`)
    one_request = False

    def connectionMade(self) -> None:
        self.timeOut = None  # no twisted.web timer: the guard's check does it
        timeouts = self.guard.timeouts
        assert self.transport is not None  # connected
        self.idle_applies = timeouts.idle_on_loopback or not is_loopback(self.getPeer())
        self.since = self.guard.clock.seconds()
        self.guard.opened(self)
        self._guarded = True
        super().connectionMade()

    def checkPersistence(self, request: http.Request, version: bytes) -> bool:
        if self.one_request:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    def getHost(self) -> IAddress:
        """This end's address, asked of the system once per connection, not per request."""
        if self._host is None:
            assert self.transport is not None  # asked by a request, on a connection
            self._host = self.transport.getHost()
        return self._host

    def getPeer(self) -> IAddress:
        """The other end's address, made once per connection, not per request."""
        if self._peer is None:
            assert self.transport is not None  # asked by a request, on a connection
            self._peer = self.transport.getPeer()
        return self._peer

    def dataReceived(self, data: bytes) -> None:
        if self.phase == IDLE:
            self.phase = HEADERS
            self.since = self.guard.clock.seconds()
        elif self.phase == BODY:
            self.body_received += len(data)
        LineReceiver.dataReceived(self, data)

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        if self.length != 0 and self.phase == HEADERS:
            self.phase = BODY
            self.since = self.guard.clock.seconds()
            self.body_received = 0

    def allContentReceived(self) -> None:
        self.phase = HANDLING  # a request being handled is never timed out
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        self.phase = IDLE
        self.since = self.guard.clock.seconds()
        super().requestDone(request)

    def timed_out(self, answer: bool) -> None:
        """Past its limit: 408 if a request was arriving, then close."""
        self.phase = HANDLING  # closing: no second verdict
        if answer:
            assert self.transport is not None  # guarded until the connection is lost
            self.transport.write(_TIMEOUT_RESPONSE)
        self.timeoutConnection()

    def abandoned(self) -> None:
        """The connection went on as HTTP/2 without this channel: stop guarding it."""
        if self._guarded:
            self._guarded = False
            self.guard.closed(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._guarded:
            self._guarded = False
            self.guard.closed(self)
        super().connectionLost(reason)


def guarded_protocol(
    timeouts: Timeouts, clock: IReactorTime, tls: bool = True
) -> Callable[[], GuardedChannel | _Negotiating]:
    """
    A ``protocol`` for a :class:`twisted.web.server.Site`: its connections
    get a :class:`GuardedChannel`; over TLS, in the wrapper twisted.web
    itself uses, which turns to HTTP/2 when ALPN chose it. Without TLS
    there is nothing to negotiate (twisted.web speaks HTTP/2 only after
    ALPN), so the channel serves the connection itself, a layer fewer on
    every read.

    :param tls: whether the listener's connections are TLS.
    """
    guard = Guard(timeouts, clock)

    def build() -> GuardedChannel | _Negotiating:
        # set on the instance, so not bound: called without the factory
        made = GuardedChannel()
        made.guard = guard
        return _Negotiating(made) if tls else made

    return build


class _Negotiating(http._GenericHTTPChannelProtocol):
    """
    twisted.web's wrapper that turns a connection into HTTP/2 when ALPN
    chose it, with :class:`~kapow.web.http2.ConformingH2Connection` where
    twisted.web would build its own ``H2Connection`` (its
    ``_GenericHTTPChannelProtocol.dataReceived`` names that class and takes
    no other: the switch below is that method's, with ours), and keeping the
    connection within its limits then too: the :class:`GuardedChannel` it
    leaves is no longer guarded (it would close the connection as idle), and
    the HTTP/2 connection closes after the idle time only while it has no
    stream open: a request being handled, however quiet, is never timed
    out, as over HTTP/1.1.
    """

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None:
            self._negotiate()
        self._channel.dataReceived(data)

    def _negotiate(self) -> None:
        channel = self._channel
        assert isinstance(channel, GuardedChannel)  # the first read: still the channel guarded_protocol made
        negotiated = getattr(channel.transport, "negotiatedProtocol", None) or b"http/1.1"
        if negotiated == b"h2":
            channel.abandoned()
            # as twisted.web does: the HTTP/1.1 channel stops producing for
            # the transport, the HTTP/2 connection takes over
            producer = channel._networkProducer
            producer.unregisterProducer()
            channel.setTimeout(None)
            transport = channel.transport
            connection = ConformingH2Connection(channel.guard.clock)
            connection.requestFactory = self._requestFactory
            connection.site = self._site
            connection.factory = self._factory
            connection.timeOut = self._timeOut
            connection.callLater = self._callLater
            self._channel = connection
            connection.makeConnection(transport)
            producer.registerProducer(connection, True)
            connection.produces_for(producer)
            _idle_only(connection, channel.guard.timeouts.idle)
        self._negotiatedProtocol = negotiated


def _idle_only(connection: ConformingH2Connection, idle: float) -> None:
    """Let the HTTP/2 ``connection`` time out after ``idle`` seconds only without open streams."""
    timed_out = connection.timeoutConnection

    def timeout_when_idle() -> None:
        if connection.streams:
            connection.resetTimeout()
        else:
            timed_out()

    connection.timeoutConnection = timeout_when_idle  # type: ignore[method-assign]  # per connection: its idle limit
    connection.setTimeout(idle)


@implementer(IStreamServerEndpoint)
class ConnectionLimit:
    """
    An endpoint whose listening port takes at most ``limit`` connections at
    once: past it, a new connection is accepted and closed at once (no
    descriptor is held for it), and the log says so at most once a second.

    :param endpoint: the stream server endpoint to listen on.
    :param limit: the most connections open at once.
    :param label: names the listener in the log.
    :param clock: the reactor's time.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, limit: int, label: str, clock: IReactorTime) -> None:
        self.endpoint = endpoint
        self.limit = limit
        self.label = label
        self.clock = clock
        self.open = 0
        self._refused = 0
        self._logged_at: float | None = None

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        # a provider of IProtocolFactory: see _LimitedFactory
        return self.endpoint.listen(cast(IProtocolFactory, _LimitedFactory(self, factory)))

    def admit(self) -> bool:
        """Count one more connection, or refuse it (and say so, now and then)."""
        if self.open < self.limit:
            self.open += 1
            return True
        self._refused += 1
        now = self.clock.seconds()
        if self._logged_at is None or now - self._logged_at >= 1.0:
            log.warn(
                "{label} interface: {n} connections closed at once: {limit} are open (--max-connections)",
                label=self.label, n=self._refused, limit=self.limit,
            )  # fmt: skip
            self._logged_at = now
            self._refused = 0
        return False

    def closed(self) -> None:
        self.open -= 1


class _LimitedFactory:
    """The factory a :class:`ConnectionLimit` listens with, around the real one.

    It declares no interface of its own: zope.interface finds
    ``__providedBy__`` through :meth:`__getattr__`, so it provides what the
    real factory provides (``IProtocolNegotiationFactory`` too, which TLS
    asks for to offer HTTP/2 by ALPN).
    """

    def __init__(self, limit: ConnectionLimit, factory: IProtocolFactory) -> None:
        self._limit = limit
        self._factory = factory

    def __getattr__(self, name: str) -> object:
        return getattr(self._factory, name)

    def doStart(self) -> None:
        self._factory.doStart()

    def doStop(self) -> None:
        self._factory.doStop()

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        if not self._limit.admit():
            return None  # the port closes the connection
        protocol = self._factory.buildProtocol(addr)
        if protocol is None:
            self._limit.closed()
            return None
        lost = protocol.connectionLost

        def connection_lost(reason: Failure) -> None:
            self._limit.closed()
            # This wrapper refers back to the protocol (through ``lost``): gone
            # now, it leaves no cycle that only the garbage collector would
            # break, and every connection of the data API would leave one.
            del protocol.connectionLost
            lost(reason)

        protocol.connectionLost = connection_lost  # type: ignore[method-assign]  # no wrapper: nothing added per read
        return protocol
