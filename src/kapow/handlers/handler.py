"""
Handlers: the state one request shares between the user interface (which
creates and finishes it) and the data API (which reads and writes it).

A handler's response moves ``PENDING`` (status, reason, headers and cookies
may change) → ``STREAMING`` (the first body byte sent them; only body
appends are possible) → ``FINISHED`` (the process exited). A handler may
complete its response early (``/response/end``): it is then ``ENDED`` until
its process exits, its request still readable, every response write
refused. On a ``buffer`` route body writes are held and the response stays
``PENDING`` until the process exits or ends it. On a WebSocket or
event-stream route the response is its :class:`ResponseStream`'s: it is
``STREAMING`` from the start, and every response write refused.
"""

from __future__ import annotations

import enum
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from typing import BinaryIO, Protocol
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from twisted.web.server import Request
from zope.interface import implementer

from kapow.core.forms import FormError, ParsedForm, parse_form
from kapow.core.messages import quoted
from kapow.core.request_parts import BodySnapshot, cookie_pairs, first_cookie, query_pairs
from kapow.core.routes import Route
from kapow.core.sniff import sniff_content_type
from kapow.web.errors import JSONError, phrase

log = Logger()

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_STATUS = re.compile(rb"[+-]?[0-9]+")
_STATUS_DIGITS = re.compile(rb"[+-]?0*([0-9]{1,3})")

#: Status of a status/header/cookie write that comes after the response started.
ALREADY_STARTED = (409, "Response Already Started")
#: Status of a response write that comes after ``/response/end``.
ALREADY_ENDED = (409, "Response Already Ended")
#: Longest reason phrase a handler may set, in bytes.
MAX_REASON = 256
#: Bytes of a ``buffer`` route's response held in memory before a temporary file.
BUFFER_IN_MEMORY = 1024 * 1024
#: Size of the pieces a held body is sent in.
HELD_CHUNK = 64 * 1024


class State(enum.Enum):
    PENDING = "pending"
    STREAMING = "streaming"
    ENDED = "ended"
    FINISHED = "finished"


def handler_ids(prefix: str = "", batch: int = 64) -> Callable[[], str]:
    """
    Makes unguessable handler ids: 32 hex digits, ``prefix`` and then random
    ones (128 random bits without a prefix), drawing the system's randomness
    for ``batch`` ids at a time: one system call for many requests.
    """
    ready: list[str] = []
    digits = 32 - len(prefix)
    step = digits + digits % 2  # hex digits of the whole random bytes of one id

    def new_id() -> str:
        if not ready:
            raw = os.urandom(step // 2 * batch).hex()
            ready.extend(prefix + raw[i : i + digits] for i in range(0, len(raw), step))
        return ready.pop()

    return new_id


class ResponseStream(Protocol):
    """The response of a WebSocket or event-stream route, as its handler drives it."""

    def process_exited(self, failed: bool) -> None:
        """The process exited (``failed``: non-zero, or by a signal); end once its output is sent."""

    def time_out(self) -> None:
        """The route's ``timeout`` is over: end now."""

    def going_away(self) -> None:
        """A graceful stop began."""


@implementer(IPushProducer)
class Handler:
    """
    One request being served by one process.

    :param handler_id: its id in the data API.
    :param route: the route it matched (kept even if the table changes).
    :param matches: values the route's placeholders captured.
    :param request: the live user request.
    """

    # what only some handlers use, as class defaults: nothing to set per request
    #: the reason phrase the handler set, if any
    reason: bytes | None = None
    #: why the server ended its process, if it did: ``timeout``, ``disconnect`` or ``killed``
    ended_by: str | None = None
    #: the body a ``buffer`` route holds until the response is complete
    _held: tempfile.SpooledTemporaryFile[bytes] | None = None
    #: the held body while it is being sent
    _sending: tempfile.SpooledTemporaryFile[bytes] | None = None
    #: the response of a WebSocket or event-stream route
    stream: ResponseStream | None = None
    #: ``/response/end`` came: from now on every write is refused, those it releases too
    _ending = False
    #: the end of its process's stderr, kept for a job
    stderr_tail: bytearray | None = None

    def __init__(self, handler_id: str, route: Route, matches: dict[str, str], request: Request) -> None:
        self.id = handler_id
        self.route = route
        self.matches = matches
        self.request = request
        self.state = State.PENDING
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = []
        self.client_gone = False
        #: called once if the user's connection is lost before the response is complete
        self.on_client_lost: Callable[[], None] | None = None
        self._form: ParsedForm | None = None
        self._query: dict[bytes, bytes] | None = None
        assert request.content is not None  # the body was received, and is kept until the request ends
        self._body = BodySnapshot(request.content)
        self._paused = False
        self._waiting: list[Deferred[None]] = []
        if route.buffer:
            self._held = tempfile.SpooledTemporaryFile(BUFFER_IN_MEMORY)  # noqa: SIM115 (closed once sent or dropped)
        if route.mode is None or route.mode == "http":
            request.registerProducer(self, True)
        else:  # its stream answers: nothing a handler writes is sent
            self.state = State.STREAMING
        request.notifyFinish().addErrback(self._lost)

    # -- request side -------------------------------------------------------

    def request_value(self, kind: str, name: str | None = None) -> bytes | None:
        """
        A value of the request snapshot, or ``None`` if the named item is
        absent.

        :param kind: ``method``, ``host``, ``version``, ``path``, ``remote``
            (no name), or ``matches``, ``params``, ``headers``, ``cookies``,
            ``form`` (with a name).
        """
        request = self.request
        if kind == "method":
            return request.method
        if kind == "host":
            return request.getHeader(b"host") or b""
        if kind == "version":
            return request.clientproto
        if kind == "path":
            return unquote_to_bytes(request.path)
        if kind == "remote":
            return getattr(request.getClientAddress(), "host", "").encode()
        if kind == "auth_user":
            return getattr(request, "kapow_auth_user", None)
        assert name is not None
        if kind == "matches":
            value = self.matches.get(name)
            return None if value is None else value.encode("utf-8", "surrogateescape")
        key = name.encode()
        if kind == "params":
            return self._params().get(key)
        if kind == "headers":
            values = request.requestHeaders.getRawHeaders(key)
            return values[0] if values else None
        if kind == "cookies":
            return first_cookie(request.requestHeaders.getRawHeaders(b"cookie", []), key)
        if kind == "form":
            value = self.form().field(name)
            return None if value is None else value.encode()
        raise ValueError(kind)

    def _params(self) -> dict[bytes, bytes]:
        if self._query is None:
            self._query = {}
            for name, value in query_pairs(self.request.uri):
                self._query.setdefault(name, value)
        return self._query

    def request_collection(self, kind: str) -> bytes:
        """
        Every item of a named kind of the request, as JSON (see "Collections"
        in the data API reference, docs/reference/data-api.rst): ``params``,
        ``headers``, ``cookies``, ``form`` (name to its values), ``files``
        (name to its uploads' descriptions) or ``matches`` (name to its
        value). Bytes that are not UTF-8 become U+FFFD.
        """
        value: Mapping[str, object]
        if kind in ("params", "headers", "cookies"):
            texts: dict[str, list[str]] = {}
            if kind == "params":
                for name, item in query_pairs(self.request.uri):
                    texts.setdefault(_json_text(name), []).append(_json_text(item))
            elif kind == "headers":
                for name, items in self.request.requestHeaders.getAllRawHeaders():
                    texts.setdefault(_json_text(name).lower(), []).extend(_json_text(item) for item in items)
            else:
                for name, item in cookie_pairs(self.request.requestHeaders.getRawHeaders(b"cookie", [])):
                    texts.setdefault(_json_text(name), []).append(_json_text(item))
            value = texts
        elif kind == "form":
            value = self.form().fields
        elif kind == "files":
            value = {
                name: [
                    {"filename": f.filename, "content_type": f.content_type, "size": f.size} for f in uploads
                ]
                for name, uploads in self.form().files.items()
            }
        elif kind == "matches":
            value = {
                name: _json_text(item.encode("utf-8", "surrogateescape"))
                for name, item in self.matches.items()
            }
        else:
            raise ValueError(kind)
        return json.dumps(value, ensure_ascii=False).encode("utf-8")

    def stdin(self) -> int:
        """
        A new descriptor, read-only and positioned at its start, over the
        whole request body (for a handler's stdin); the caller closes it.
        """
        return self._body.descriptor()

    def body(self) -> BinaryIO:
        """A new reader over the whole request body, independent of others."""
        return self._body.open()

    @property
    def body_size(self) -> int:
        """The request body's size in bytes."""
        return self._body.size

    def form(self) -> ParsedForm:
        """The request's form fields and files, parsed on first use."""
        if self._form is None:
            try:
                with self._body.open() as body:
                    self._form = parse_form(self.request.getHeader(b"content-type"), body)
            except FormError as e:
                # as the reference: an unparsable form has no fields or files
                log.info("handler {id}: unparsable form: {why}", id=self.id, why=str(e))
                self._form = ParsedForm({}, {})
        return self._form

    # -- response side ------------------------------------------------------

    def set_status(self, raw: bytes) -> None:
        """Set the status from its text; the last write wins."""
        self._check_pending()
        text = raw.strip()
        if not _STATUS.fullmatch(text):
            raise JSONError(422, "Non Integer Value", f"status {_shown(text)} is not an integer")
        code = int(text) if _STATUS_DIGITS.fullmatch(text) else 0  # more digits: out of range
        if not 200 <= code <= 999:
            raise JSONError(400, "Invalid Status Code", f"status {_shown(text)} is not from 200 to 999")
        self.status = code

    def add_header(self, name: str, raw: bytes) -> None:
        """Add one value of header ``name``."""
        self._check_pending()
        self.headers.append((_token(name, "header"), _field_value(raw, "header")))

    def add_cookie(self, name: str, raw: bytes) -> None:
        """Add a ``Set-Cookie`` for cookie ``name``."""
        self._check_pending()
        value = _field_value(raw, "cookie")
        if re.search(rb'[\s,;"\\]', value):
            value = b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        self.headers.append((b"Set-Cookie", _token(name, "cookie") + b"=" + value))

    def remove_header(self, name: str) -> None:
        """Drop every value of header ``name`` written so far."""
        self._check_pending()
        lower = _token(name, "header").lower()
        self.headers = [(key, value) for key, value in self.headers if key.lower() != lower]

    def remove_cookie(self, name: str) -> None:
        """Drop every ``Set-Cookie`` of cookie ``name`` written so far."""
        self._check_pending()
        prefix = _token(name, "cookie") + b"="
        self.headers = [
            (key, value)
            for key, value in self.headers
            if key.lower() != b"set-cookie" or not value.lstrip().startswith(prefix)
        ]

    def set_reason(self, raw: bytes) -> None:
        """Set the status line's reason phrase; empty: the standard one."""
        self._check_pending()
        value = raw[:-1] if raw.endswith(b"\n") else raw
        if len(value) > MAX_REASON:
            raise JSONError(
                400, "Invalid Reason Phrase", f"the reason phrase is {len(value)} bytes, over {MAX_REASON}"
            )
        _check_no_control(value, "reason phrase", "Invalid Reason Phrase")
        self.reason = value or None

    def end(self) -> None:
        """
        Complete the response now with what was written (a ``buffer``
        route's held body included); the process runs on, and its request
        stays readable, until it exits.
        """
        if self.state is State.ENDED:
            raise JSONError(*ALREADY_ENDED)
        if self.stream is not None:
            raise JSONError(*ALREADY_STARTED)
        if self.state is State.FINISHED:
            return
        self._ending = True
        self._complete()
        self.state = State.ENDED

    def fail(self, code: int) -> bool:
        """
        The process failed: give the response status ``code`` unless the
        handler set one >= 400 itself (its reason phrase, written for
        another status, goes with the status it replaces).

        :return: ``False`` if the response needed it but had started.
        """
        if self.status >= 400 or self.client_gone:
            return True
        if self.state is not State.PENDING:
            return False
        self.status = code
        self.reason = None
        return True

    def write(self, data: bytes) -> Deferred[None]:
        """
        Append ``data`` to the response body, sending status and headers
        first if this is the first byte.

        :return: fires once the user's connection has taken the bytes (at
            once unless it is paused).
        """
        if self._ending:
            raise JSONError(*ALREADY_ENDED)
        if self.stream is not None:
            raise JSONError(*ALREADY_STARTED)
        if self.state is State.FINISHED or self.client_gone:
            return succeed(None)
        if not data:
            return succeed(None)
        if self._held is not None:
            self._held.write(data)
            return succeed(None)
        if self.state is State.PENDING:
            self._commit(data)
        self.request.write(data)
        if not self._paused:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def finish(self, failed: bool = False) -> None:
        """
        Complete the response (the process has exited; ``failed``: not
        with status 0).
        """
        if self.state is State.FINISHED:
            return
        if self.stream is not None:
            self.stream.process_exited(failed)
        elif self.state is not State.ENDED:
            self._complete()
        self.state = State.FINISHED
        if self._form is not None:
            self._form.close()
        self._body.close()

    def _complete(self) -> None:
        """Send what is still to be sent and complete the user's request."""
        self._release()
        held, self._held = self._held, None
        if self.client_gone:
            if held is not None:
                held.close()
            return
        if held is not None and self.state is State.PENDING:
            size = held.tell()
            held.seek(0)
            self._commit(held.read(512), size if _may_have_body(self.status) else None)
            held.seek(0)
            if size and self.request.method != b"HEAD":
                self._sending = held
                self._send_held()
                return
            held.close()
        elif self.state is State.PENDING:
            # an empty body announced, as the reference does, where a body may be
            empty = self.request.method != b"HEAD" and _may_have_body(self.status)
            self._commit(b"", 0 if empty else None)
        self.request.unregisterProducer()
        self.request.finish()

    def _send_held(self) -> None:
        """Send the held body while the user's connection takes it, then complete."""
        held = self._sending
        while held is not None and not self._paused:
            chunk = held.read(HELD_CHUNK)
            if chunk:
                self.request.write(chunk)
                continue
            self._sending = None
            held.close()
            self.request.unregisterProducer()
            self.request.finish()
            return

    def abandon(self) -> None:
        """
        Give up the handler before its process started: release what it
        holds and leave the request to the caller.
        """
        self.state = State.FINISHED
        if self.stream is None:
            self.request.unregisterProducer()
        if self._held is not None:
            self._held.close()
        self._body.close()

    def time_out(self) -> None:
        """
        End the response early because the handler ran out of time: 504 if
        nothing was sent yet, else the connection is cut so the client sees
        a truncated response rather than a complete-looking one.
        """
        if self.stream is not None:
            self.stream.time_out()
            self.state = State.FINISHED
            self._body.close()
            return
        if self.state in (State.FINISHED, State.ENDED) or self.client_gone:
            if self.state is not State.FINISHED:
                self.finish()
            return
        if self.state is State.PENDING:
            if self._held is not None:
                self._held.close()
                self._held = None
            self.status = 504
            self.reason = None
            self.headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
            self._commit(b"")
            self.request.write(b"Gateway Timeout\n")
            self.finish()
            return
        self.state = State.FINISHED
        self._release()
        self.request.unregisterProducer()
        transport = self.request.channel.transport
        assert transport is not None  # the client is still there
        transport.loseConnection()

    def _commit(self, first: bytes, length: int | None = None) -> None:
        """
        Send the status and headers, before ``first``, the first bytes of
        the body; ``length``: the whole body's, known in advance.
        """
        request = self.request
        request.setResponseCode(self.status, self.reason or phrase(self.status))
        names = set()
        for name, value in self.headers:
            request.responseHeaders.addRawHeader(name, value)
            names.add(name.lower())
        if b"content-type" not in names and first and _may_have_body(self.status):
            # no body (none written, or none the status allows): no type, as the reference
            request.setHeader(b"Content-Type", sniff_content_type(first).encode())
        if length is not None:
            request.setHeader(b"Content-Length", b"%d" % length)
        self.state = State.STREAMING

    def _check_pending(self) -> None:
        if self.state is not State.PENDING:
            raise JSONError(*(ALREADY_ENDED if self.state is State.ENDED else ALREADY_STARTED))

    # -- flow control from the user's connection (IPushProducer) -----------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._release()
        if self._sending is not None:
            self._send_held()

    def stopProducing(self) -> None:
        self._lost(None)

    def _lost(self, reason: Failure | None) -> None:
        if self.client_gone:
            return
        self.client_gone = True
        self._release()
        if self._sending is not None:
            self._sending.close()
            self._sending = None
        if self.state is not State.FINISHED and self.on_client_lost is not None:
            self.on_client_lost()

    def _release(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


def _may_have_body(status: int) -> bool:
    """Whether a response of ``status`` may have a body (and so a type and a ``Content-Length``)."""
    return status not in NO_BODY_CODES


def _json_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _shown(raw: bytes) -> str:
    """A value a handler wrote, as a refusal's detail names it."""
    return quoted(raw.decode("utf-8", "replace"))


def _token(name: str, kind: str) -> bytes:
    """``name`` of a ``kind`` (header or cookie), refused unless it is an HTTP token."""
    raw = name.encode("utf-8", "replace")
    if not _TOKEN.fullmatch(raw):
        raise JSONError(400, "Invalid Resource Path", f"{kind} name {quoted(name)} is not an HTTP token")
    return raw


def _field_value(raw: bytes, kind: str) -> bytes:
    """The value of a ``kind`` (header or cookie) written as ``raw``, one trailing newline removed."""
    value = raw[:-1] if raw.endswith(b"\n") else raw
    _check_no_control(value, f"{kind} value", "Invalid Header Value")
    return value


def _check_no_control(value: bytes, what: str, reason: str) -> None:
    """Refuse ``value`` (``what`` it is) with 400 ``reason`` if it holds a control character."""
    found = _CONTROL.search(value)
    if found is not None:
        character = quoted(found.group().decode("ascii"))
        raise JSONError(
            400, reason, f"the {what} holds the control character {character} at byte {found.start()}"
        )


class HandlerRegistry:
    """
    Live handlers by id; a finished handler is forgotten at once.

    :param new_id: makes the ids (:func:`handler_ids` by default).
    """

    def __init__(self, new_id: Callable[[], str] | None = None) -> None:
        self._handlers: dict[str, Handler] = {}
        self._new_id = handler_ids() if new_id is None else new_id

    def new_id(self) -> str:
        """A fresh handler id, for a request that waits before its handler is created."""
        return self._new_id()

    def create(
        self, route: Route, matches: dict[str, str], request: Request, handler_id: str | None = None
    ) -> Handler:
        """Register the handler of ``request``, with ``handler_id`` or a fresh id."""
        handler = Handler(handler_id or self._new_id(), route, matches, request)
        self._handlers[handler.id] = handler
        return handler

    def live(self) -> list[Handler]:
        """Every live handler."""
        return list(self._handlers.values())

    def get(self, handler_id: str) -> Handler | None:
        return self._handlers.get(handler_id)

    def forget(self, handler: Handler) -> None:
        self._handlers.pop(handler.id, None)

    def __len__(self) -> int:
        return len(self._handlers)
