"""
The data API (docs/reference/data-api.rst): ``GET|PUT|DELETE
/handlers/{id}{resource}``, through which a handler process reads its
request and writes its response.

Body writes arrive as a sequence of appending PUTs (``kapow set`` sends what
it reads as soon as it reads it); each PUT is answered only once the user's
connection has taken its bytes, which gives end-to-end flow control with
about one chunk per handler in memory. A single large PUT from another
client works too: twisted.web spools it to disk before it is appended.

Handlers make several calls per request, so this is a plain twisted.web leaf
resource, as the user interface is: routing a call through Klein and
werkzeug cost more than answering it. :func:`parse_resource` is the one
place that knows the resource tree. The plain requests of handlers' clients
reach it without twisted.web's request machinery, through
:class:`kapow.data.channel.DataChannel`, which answers them as twisted.web
would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO, cast

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET

from kapow.core.forms import UploadedFile
from kapow.handlers.handler import ALREADY_ENDED, Handler, HandlerRegistry, State
from kapow.web.errors import JSONError, reason_body

log = Logger()
server_log = Logger(namespace="kapow.handler")

OCTET_STREAM = b"application/octet-stream"
#: Largest value a status, header, cookie or log write may carry.
MAX_VALUE = 1024 * 1024
#: Size of the pieces a large body write is appended in.
CHUNK_SIZE = 64 * 1024
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")

# resource -> (direction, arity); arity counts the name segments after it
_READ_SIMPLE = {"method", "host", "version", "path", "remote"}
_READ_NAMED = {"matches", "params", "headers", "cookies", "form"}
_COLLECTIONS = {*_READ_NAMED, "files"}
_BROKEN_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
JSON = b"application/json"


@dataclass(frozen=True)
class Resource:
    """A parsed resource path: what to do, in which direction, with what name."""

    kind: str
    writable: bool
    name: str | None = None
    #: whether ``DELETE`` removes it
    removable: bool = False


def parse_resource(segments: list[str]) -> Resource:
    """
    Parse the resource path after the handler id.

    :raises JSONError: 400 ``Invalid Resource Path`` outside the tree.
    """
    match segments:
        case ["request", kind] if kind in _READ_SIMPLE:
            return Resource(kind, False)
        case ["request", "body"]:
            return Resource("body", False)
        case ["request", kind] if kind in _COLLECTIONS:
            return Resource("all_" + kind, False)
        case ["request", kind, name] if kind in _READ_NAMED and name:
            return Resource(kind, False, name)
        case ["request", "files", name, ("filename" | "content") as part] if name:
            return Resource("file_" + part, False, name)
        case ["request", "auth", "user"]:
            return Resource("auth_user", False)
        case ["route", "id"]:
            return Resource("route_id", False)
        case ["ssl", "client", "i", "dn"]:
            return Resource("client_dn", False)
        case ["response", ("status" | "body" | "stream" | "reason" | "end") as kind]:
            return Resource(kind, True)
        case ["response", ("headers" | "cookies") as kind, name] if name:
            return Resource(kind, True, name, removable=True)
        case ["server", "log"]:
            return Resource("log", True)
        case ["server", "log", prefix] if prefix:
            return Resource("log", True, prefix)
    raise JSONError(400, "Invalid Resource Path")


_ALLOWED = b"GET, HEAD, PUT, DELETE"
_METHODS = (b"GET", b"HEAD", b"PUT", b"DELETE")


class DataAPI(resource.Resource):
    """
    The data interface: ``GET|PUT|DELETE /handlers/{id}{resource}``; every
    error is a JSON reason.

    :param handlers: the live handlers, by id.
    """

    isLeaf = True

    def __init__(self, handlers: HandlerRegistry) -> None:
        super().__init__()
        self.handlers = handlers

    def resource(self) -> DataAPI:
        """The Twisted resource serving this API (itself)."""
        return self

    def render(self, request: IRequest) -> bytes | int:
        try:
            result = self.handle(request)
        except Exception:
            return _error_body(request, Failure())
        if isinstance(result, Deferred):
            result.addErrback(lambda failure: _error_body(request, failure))
            result.addCallback(lambda body: _finish(request, body))
            return NOT_DONE_YET
        return result

    def handle(self, request: IRequest) -> bytes | Deferred[bytes]:
        """The answer to ``request``: bytes, or a Deferred of them."""
        method = request.method
        if method not in _METHODS:
            request.setHeader(b"Allow", _ALLOWED)
            raise JSONError(405, "Method Not Allowed")
        if b"%" in request.path and _BROKEN_ESCAPE.search(request.path):
            raise JSONError(400, "Invalid Resource Path")
        try:
            path = b"/".join(request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            raise JSONError(400, "Invalid Resource Path") from None
        top, _, rest = path.partition("/")
        handler_id, _, rest = rest.partition("/")
        if top != "handlers" or not handler_id or not rest:
            raise JSONError(404, "Not Found")
        target = parse_resource(rest.split("/"))
        if method == b"DELETE":
            if not target.removable:
                raise JSONError(405, "Method Not Allowed")
        elif (method == b"PUT") != target.writable:
            raise JSONError(405, "Method Not Allowed")
        handler = self.handlers.get(handler_id)
        if handler is None:
            raise JSONError(404, "Handler ID Not Found")
        if method == b"PUT":
            return self._write(request, handler, target)
        if method == b"DELETE":
            if target.kind == "headers":
                handler.remove_header(target.name or "")
            else:
                handler.remove_cookie(target.name or "")
            return b""
        return self._read(request, handler, target)

    def _read(self, request: IRequest, handler: Handler, target: Resource) -> bytes | Deferred[bytes]:
        if target.kind == "body":
            body = handler.body()
            return _send_file(request, body, body.seek(0, 2))
        if target.kind == "file_content":
            upload = _file(handler, target.name)
            return _send_file(request, upload.open(), upload.size)
        if target.kind.startswith("all_"):
            collection = handler.request_collection(target.kind[4:])
            request.setHeader(b"Content-Type", JSON)
            request.setHeader(b"Content-Length", b"%d" % len(collection))
            return collection
        if target.kind == "file_filename":
            value: bytes | None = _file(handler, target.name).filename.encode()
        elif target.kind == "route_id":
            value = handler.route.id.encode()
        elif target.kind == "client_dn":
            from kapow.web.tls import peer_subject_dn

            dn = peer_subject_dn(handler.request.transport or handler.request.channel)
            value = None if dn is None else dn.encode()
        else:
            value = handler.request_value(target.kind, target.name)
        if value is None:
            raise JSONError(404, "Resource Item Not Found")
        request.setHeader(b"Content-Type", OCTET_STREAM)
        request.setHeader(b"Content-Length", b"%d" % len(value))
        return value

    def _write(self, request: IRequest, handler: Handler, target: Resource) -> bytes | Deferred[bytes]:
        if handler.state is State.ENDED and target.kind != "log":
            raise JSONError(*ALREADY_ENDED)
        if target.kind == "end":
            handler.end()
            return b""
        if target.kind in ("body", "stream"):
            return _append(handler, request.content)
        data = request.content.read(MAX_VALUE + 1)
        if len(data) > MAX_VALUE:
            raise JSONError(413, "Request Entity Too Large")
        if target.kind == "status":
            handler.set_status(data)
        elif target.kind == "headers":
            handler.add_header(target.name or "", data)
        elif target.kind == "cookies":
            handler.add_cookie(target.name or "", data)
        elif target.kind == "reason":
            handler.set_reason(data)
        else:
            _log_lines(handler, target.name, data)
        return b""


def _error_body(request: IRequest, failure: Failure) -> bytes:
    """The JSON answer for an error: its reason, or 500 for the unexpected
    (logged with its traceback, never sent)."""
    error = failure.value
    if isinstance(error, JSONError):
        return reason_body(request, error.code, error.reason)
    log.failure("Unhandled error answering {uri}", failure, uri=request.uri)
    return reason_body(request, 500, "Internal Server Error")


def _finish(request: IRequest, body: bytes) -> None:
    if request.finished or request._disconnected:  # type: ignore[attr-defined]  # Request's (and _Call's), not in IRequest
        return
    if body:
        request.write(body)
    elif not request.startedWriting:  # type: ignore[attr-defined]  # Request's (and _Call's), not in IRequest
        # as a value answered at once: no content, no type
        request.setHeader(b"Content-Length", b"0")
    request.finish()


def _append(handler: Handler, content: BinaryIO) -> bytes | Deferred[bytes]:
    """
    Append a PUT's body to the response a chunk at a time, each once the
    user's connection took the one before (a large PUT arrives spooled to
    disk and never sits in memory whole).

    :return: ``b""`` when every chunk was taken at once (the usual case,
        answered without a Deferred), else a Deferred of it.
    """
    while chunk := content.read(CHUNK_SIZE):
        taken = handler.write(chunk)
        if not taken.called:
            return taken.addCallback(lambda _: _append(handler, content))
        if isinstance(taken.result, Failure):
            return cast("Deferred[bytes]", taken)  # failed: it never gives a value
    return b""


def _file(handler: Handler, name: str | None) -> UploadedFile:
    upload = handler.form().file(name or "")
    if upload is None:
        raise JSONError(404, "Resource Item Not Found")
    return upload


def _send_file(request: IRequest, f: BinaryIO, size: int) -> Deferred[bytes]:
    """Stream the ``size`` bytes of ``f`` to ``request`` with a producer, then close it."""
    f.seek(0)
    request.setHeader(b"Content-Type", OCTET_STREAM)
    request.setHeader(b"Content-Length", str(size).encode())
    d = FileSender().beginFileTransfer(f, request)

    def done(result: object) -> bytes:
        f.close()
        return b""

    return d.addBoth(done)


def _clean(text: str) -> str:
    return _UNPRINTABLE.sub("", text)


def _log_lines(handler: Handler, prefix: str | None, data: bytes) -> None:
    head = _clean(handler.id) + (" " + _clean(prefix) if prefix else "")
    for line in data.decode("utf-8", "replace").splitlines() or [""]:
        server_log.info("{head}: {text}", head=head, text=line)
