"""
The user interface's site and its access log: one Common Log Format line per
request, under the ``kapow.access`` namespace, with the handler id as the
identity field; a request whose connection was lost before its response
completed is logged too.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from kapow.core.metrics import Metrics

__all__ = ["UserRequest", "UserSite", "access_line"]

access_log = Logger(namespace="kapow.access")


class UserRequest(Request):
    """
    A user request that is access-logged even when its connection is lost
    before the response completed (client gone, or a streamed response cut
    by a timeout); one never started is logged with status 499, "client
    closed request". A WebSocket connection is logged when it ends, with
    status 101 and the bytes of the messages it sent.

    Its version reads as the reference spells it, ``HTTP/2.0`` over HTTP/2
    (twisted.web's is ``HTTP/2``), for handlers and the access log alike;
    and an answer gets no ``Content-Type`` that neither its handler nor the
    user interface set (twisted.web's default is ``text/html``).
    """

    defaultContentType = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        super().requestReceived(command, path, b"HTTP/2.0" if version == b"HTTP/2" else version)

    def connectionLost(self, reason: Failure) -> None:
        unfinished = not self.finished and not self._disconnected
        super().connectionLost(reason)
        site = self.site
        if unfinished and site is not None:
            if not self.startedWriting and not getattr(self, "kapow_upgraded", False):
                self.code = 499
            site.log(self)


class UserSite(Site):
    """
    The user interface's site: bodies are never parsed as forms by
    twisted.web (handlers parse them lazily), and every request leaves one
    Common Log Format line with the handler id as identity (and, in a
    worker of ``--workers``, the worker's number as the event's ``worker``).

    :param resource: the user interface.
    :param worker: the number of the worker it serves in, if any.
    :param metrics: where answered requests are counted, if anywhere.
    :param kwargs: the rest of :class:`twisted.web.server.Site`'s arguments.
    """

    requestFactory = UserRequest

    def __init__(
        self, resource: IResource, worker: int | None = None, metrics: Metrics | None = None, **kwargs: Any
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.worker = worker
        self.metrics = metrics
        self._log_second: int | None = None
        self._log_date = ""

    def log(self, request: http.Request) -> None:
        """
        Log ``request``, finished, once its answer is on its way
        (:func:`send_now`). Not in a worker: there the handler's slot goes
        back to the main process in a message that leaves at the reactor's
        next turn, and an answer sent before it would let the client's next
        request find the slot still taken.
        """
        if self.worker is None:
            send_now(request.channel)
        now = self.reactor.seconds()
        if int(now) != self._log_second:  # one log date per second, as twisted.web keeps one
            self._log_second = int(now)
            self._log_date = http.datetimeToLogString(now)
        access_log.info("{line}", line=access_line(request, self._log_date), worker=self.worker)
        if self.metrics is not None:
            started = getattr(request, "kapow_started", now)
            self.metrics.request_done(
                getattr(request, "kapow_route", None), request.method, request.code, now - started
            )


def send_now(channel: object) -> None:
    """
    Hand what the TCP connection beneath ``channel`` holds to the kernel now,
    as the reactor would at its next turn once the socket is writable: a
    finished answer then reaches its client before the server logs it and
    records its run, which takes longer than the answer's own path. Left to
    the reactor: any other transport (HTTP/2's streams), a connection that
    is closing, and one whose producer it paused (the channel would be asked
    to read on from here).
    """
    transport = getattr(channel, "transport", None)
    while transport is not None and not isinstance(transport, tcp.Connection):
        # a protocol wrapper (the PROXY protocol's), or a TLS layer, which holds
        # small writes until the reactor's turn: there it sends what TLS gave it before
        transport = getattr(transport, "transport", None)
    if transport is None or not transport.connected or transport.disconnecting or transport.producerPaused:
        return
    transport.doWrite()  # an error is the reactor's to see: what is unsent stays registered


def access_line(request: http.Request, date: str | None = None) -> str:
    """
    The Common Log Format line (with referrer and agent) for ``request``.

    :param date: the date field as :func:`twisted.web.http.datetimeToLogString`
        gives it; now by default.
    """
    host = getattr(request.getClientAddress(), "host", "-")
    identity = getattr(request, "kapow_handler_id", "-")
    return '{} {} {} {} "{} {} {}" {} {} "{}" "{}"'.format(
        host,
        identity,
        _quoted(getattr(request, "kapow_auth_user", None)),
        date or http.datetimeToLogString(),
        _quoted(request.method),
        _quoted(request.uri),
        _quoted(request.clientproto),
        request.code,
        request.sentLength,
        _quoted(request.getHeader(b"referer")),
        _quoted(request.getHeader(b"user-agent")),
    )


def _quoted(value: bytes | None) -> str:
    """A field of the log line, escaped as twisted.web escapes it."""
    if not value:
        return "-"
    if value.isascii():
        text = value.decode("ascii")
        if text.isprintable() and '"' not in text and "'" not in text and "\\" not in text:
            return text  # nothing to escape: the common case, without repr
    return http._escape(value)
