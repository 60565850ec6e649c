# -*- test-case-name: tests.unit.test_streams,tests.e2e.test_streams -*-
"""
Event-stream routes (``mode: "events"``, SPEC.md §11): the process's stdout
as Server-Sent Events on the ordinary response path, over HTTP/1.1 or
HTTP/2.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorTime
from twisted.web.server import Request

from kapow.streams.lines import Lines, ProcessOutput

__all__ = ["FIELDS", "KEEP_ALIVE", "EventStream", "event_bytes"]

#: Lines passed through as a field of the next event rather than as its data.
FIELDS = (b"event:", b"id:", b"retry:")
#: The comment sent while nothing else is.
KEEP_ALIVE = b": keep-alive\n"
#: Seconds the rest of the output may take to arrive once the process exited
#: (a background child may hold its stdout).
OUTPUT_GRACE = 1.0

_HEADERS = (
    (b"Content-Type", b"text/event-stream"),
    (b"Cache-Control", b"no-cache"),
    (b"X-Accel-Buffering", b"no"),
)


def event_bytes(line: bytes) -> bytes:
    """One stdout line as the event stream carries it."""
    if line.startswith(FIELDS):
        return line + b"\n"
    return b"data: " + line + b"\n\n"


class EventStream:
    """
    One request of an ``events`` route: answered 200 when its process
    starts, then each line of the process's stdout as it is complete, a
    comment every ``heartbeat`` seconds while nothing else is sent, and the
    end of the response once the process exited and its stdout ended (or
    :data:`OUTPUT_GRACE` seconds after the exit).

    :param request: the user's request.
    :param heartbeat: seconds between keep-alive comments (0: none).
    :param clock: the reactor's clock.
    :param longest: the longest line, in bytes; a longer one is cut.
    """

    wants_stdin = False

    def __init__(self, request: Request, heartbeat: float, clock: IReactorTime, longest: int) -> None:
        self.request = request
        self.heartbeat = heartbeat
        self.clock = clock
        self._lines = Lines(longest)
        self._last_sent = 0.0
        self._beat: IDelayedCall | None = None
        self._exited = False
        self._output_over = False
        self._grace: IDelayedCall | None = None
        self.done = False

    # -- the process (kapow.handlers.spawn.ProcessStream) --------------------

    def process_started(self, process: IProcessTransport) -> None:
        request = self.request
        if self._gone():
            return
        request.setResponseCode(200)
        for name, value in _HEADERS:
            request.setHeader(name, value)
        request.write(b"")  # the headers, now
        request.registerProducer(ProcessOutput(process), True)
        self._sent()

    def output(self, data: bytes) -> None:
        if self._gone():
            return
        lines = self._lines.feed(data)
        if lines:
            self.request.write(b"".join(event_bytes(line) for line in lines))
            self._sent()

    def output_ended(self) -> None:
        self._output_over = True
        rest = self._lines.rest()
        if rest is not None and not self._gone():
            self.request.write(event_bytes(rest))
        if self._exited:
            self._finish()

    # -- the handler (kapow.handlers.handler.ResponseStream) ------------------

    def process_exited(self, failed: bool) -> None:
        self._exited = True
        if self._output_over:
            self._finish()
        elif self._grace is None:
            self._grace = self.clock.callLater(OUTPUT_GRACE, self._finish)

    def time_out(self) -> None:
        """Out of time: the connection is cut, as a streamed response's is."""
        self._stop_beating()
        gone, self.done = self._gone(), True
        if not gone:
            self.request.unregisterProducer()
            transport = self.request.channel.transport
            if transport is not None:
                transport.loseConnection()

    def going_away(self) -> None:
        """A graceful stop: the stream drains as any response does."""

    # -- inside --------------------------------------------------------------

    def _gone(self) -> bool:
        request = self.request
        return self.done or bool(request._disconnected) or bool(request.finished)

    def _finish(self) -> None:
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        self._stop_beating()
        if self._gone():
            self.done = True
            return
        self.done = True
        request = self.request
        if not request.startedWriting:  # exited before it could start
            request.setResponseCode(200)
            for name, value in _HEADERS:
                request.setHeader(name, value)
        request.unregisterProducer()
        request.finish()

    def _sent(self) -> None:
        self._last_sent = self.clock.seconds()
        if self.heartbeat > 0 and self._beat is None:
            self._beat = self.clock.callLater(self.heartbeat, self._keep_alive)

    def _keep_alive(self) -> None:
        self._beat = None
        if self._gone():
            return
        quiet = self.clock.seconds() - self._last_sent
        if quiet >= self.heartbeat:
            self.request.write(KEEP_ALIVE)
            self._sent()
        else:
            self._beat = self.clock.callLater(self.heartbeat - quiet, self._keep_alive)

    def _stop_beating(self) -> None:
        if self._beat is not None and self._beat.active():
            self._beat.cancel()
        self._beat = None
