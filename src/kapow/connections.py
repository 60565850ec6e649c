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

import ipaddress
import json
import resource
import socket
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.web import http

log = Logger()

#: Descriptors kept out of the connection limits' defaults (logs, pidfds,
#: listening sockets, the launcher, pipes).
RESERVED_FILES = 64

_IDLE, _HEADERS, _BODY, _HANDLING = range(4)


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
    if kind not in ("tcp", "tcp6", "unix") or ":backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def is_loopback(address: Any) -> bool:
    """Whether a peer ``address`` is this machine (loopback IP, or a UNIX socket)."""
    host = getattr(address, "host", None)
    if host is None:
        return True  # a UNIX socket: only this machine reaches it
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


_TIMEOUT_BODY = json.dumps({"reason": "Request Timeout"}).encode()
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class GuardedChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel with the time limits of :class:`Timeouts`, kept with
    the one timer twisted.web's channel already has (``TimeoutMixin``): it
    measures idle time between requests, header time from a request's first
    byte, body time while a body arrives, and nothing while a request is
    handled. A request too slow to arrive gets 408 and the connection closes.

    :ivar timeouts: the listener's :class:`Timeouts`.
    :ivar clock: the reactor's time.
    """

    timeouts: Timeouts
    clock: Any
    _phase = _IDLE
    _body_start = 0.0
    _body_received = 0

    def connectionMade(self) -> None:
        if not self.timeouts.idle_on_loopback and is_loopback(self.transport.getPeer()):
            self.timeOut = None
        else:
            self.timeOut = self.timeouts.idle
        super().connectionMade()

    def _arm(self, period: float | None) -> None:
        # the timer for ``period``; ``timeOut`` stays the idle time, which
        # twisted.web pauses and restores around each request
        idle = self.timeOut
        self.setTimeout(period)
        self.timeOut = idle

    def dataReceived(self, data: bytes) -> None:
        # unlike twisted.web, no resetTimeout per read: a trickle is not progress
        if self._phase == _IDLE:
            self._phase = _HEADERS
            self._arm(self.timeouts.header)
        elif self._phase == _BODY:
            self._body_received += len(data)
        LineReceiver.dataReceived(self, data)

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        if self.length != 0 and self._phase == _HEADERS:
            self._phase = _BODY
            self._body_start = self.clock.seconds()
            self._body_received = 0
            self._arm(self.timeouts.header)

    def allContentReceived(self) -> None:
        self._phase = _HANDLING
        self._arm(None)  # a request being handled is never timed out
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self._phase = _IDLE
        super().requestDone(request)

    def timeoutConnection(self) -> None:
        if self._phase == _HANDLING:
            return
        if self._phase == _BODY:
            due = self._body_start + self.timeouts.header + self._body_received / self.timeouts.body_rate
            left = due - self.clock.seconds()
            if left > 0:  # slow, but not below the rate: look again when it would be
                self._arm(left)
                return
            log.info("closing a connection whose request body came too slowly")
        if self._phase in (_HEADERS, _BODY):
            self.transport.write(_TIMEOUT_RESPONSE)
        super().timeoutConnection()


def guarded_protocol(timeouts: Timeouts, clock: Any) -> Callable[[Any], Any]:
    """
    A ``protocol`` for a :class:`twisted.web.server.Site`: its connections
    get a :class:`GuardedChannel`, in the wrapper twisted.web itself uses
    (which also negotiates HTTP/2 where it is available).
    """

    def build(*_factory: Any) -> Any:
        # set on the instance, so not bound: called without the factory
        channel = GuardedChannel()
        channel.timeouts = timeouts
        channel.clock = clock
        return http._GenericHTTPChannelProtocol(channel)

    return build


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

    def __init__(self, endpoint: Any, limit: int, label: str, clock: Any) -> None:
        self.endpoint = endpoint
        self.limit = limit
        self.label = label
        self.clock = clock
        self.open = 0
        self._refused = 0
        self._logged_at: float | None = None

    def listen(self, factory: Any) -> Any:
        return self.endpoint.listen(_LimitedFactory(self, factory))

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
    """The factory a :class:`ConnectionLimit` listens with, around the real one."""

    def __init__(self, limit: ConnectionLimit, factory: Any) -> None:
        self._limit = limit
        self._factory = factory

    def __getattr__(self, name: str) -> Any:
        return getattr(self._factory, name)

    def doStart(self) -> None:
        self._factory.doStart()

    def doStop(self) -> None:
        self._factory.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        if not self._limit.admit():
            return None  # the port closes the connection
        protocol = self._factory.buildProtocol(addr)
        if protocol is None:
            self._limit.closed()
            return None
        lost: Callable[[Any], None] = protocol.connectionLost

        def connection_lost(reason: Any) -> None:
            self._limit.closed()
            lost(reason)

        # no wrapper around the protocol: nothing is added to each read and write
        protocol.connectionLost = connection_lost
        return protocol
