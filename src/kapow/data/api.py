# -*- test-case-name: tests.unit.test_data_api,tests.unit.test_data_app_wire -*-
"""
The data API (docs/reference/data-api.rst): ``GET|PUT|DELETE
/handlers/{id}{resource}``, through which a handler process reads its
request and writes its response.

The resource tree is the routes of :class:`DataAPI`: one Klein route for each
family of resources (the simple values of the request, its named items, the
response's fields, the log...), a werkzeug ``any`` converter naming the
members of a family. A path outside the tree is 400 ``Invalid Resource
Path``; a resource asked with the wrong method (a read of a write-only one,
``DELETE`` of one that cannot be removed) is 405.

Body writes arrive as a sequence of appending PUTs (``kapow set`` sends what
it reads as soon as it reads it); each PUT is answered only once the user's
connection has taken its bytes, which gives end-to-end flow control with
about one chunk per handler in memory. A single large PUT from another
client works too: twisted.web spools it to disk before it is appended.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO, NoReturn, cast

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from kapow.core.forms import UploadedFile
from kapow.core.messages import quoted
from kapow.data.resource import DataResource
from kapow.handlers.handler import ALREADY_ENDED, Handler, HandlerRegistry, State
from kapow.web.errors import JSONError, install_json_errors
from kapow.web.tls import peer_subject_dn

__all__ = ["DataAPI"]

server_log = Logger(namespace="kapow.handler")

OCTET_STREAM = b"application/octet-stream"
JSON = b"application/json"
#: Largest value a status, header, cookie or log write may carry.
MAX_VALUE = 1024 * 1024
#: Size of the pieces a large body write is appended in.
CHUNK_SIZE = 64 * 1024
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")

#: Every method the data API answers; any other is refused before its path is looked at.
_METHODS = (b"GET", b"HEAD", b"PUT", b"DELETE")
_ALLOWED = b", ".join(_METHODS)
#: The methods of a read (werkzeug adds ``HEAD``) and of a write.
_READ = ["GET"]
_WRITE = ["PUT"]
#: The start of every resource's path.
_HANDLER = "/handlers/<handler_id>"
_INVALID_PATH = (400, "Invalid Resource Path")


@dataclass
class DataAPI:
    """
    The data interface as a Klein application; every error is a JSON reason.

    :param handlers: the live handlers, by id.
    """

    handlers: HandlerRegistry

    app = Klein()
    # the path is matched as sent: an empty segment is outside the tree, never merged away
    app.url_map.merge_slashes = False

    def resource(self) -> IResource:
        """The Twisted resource serving this API."""
        return DataResource(self.app, JSONError(*_INVALID_PATH), _HANDLER)

    # -- reads ----------------------------------------------------------------

    @app.route(_HANDLER + "/request/<any(method, host, version, path, remote):kind>", methods=_READ)
    def request_value(self, request: IRequest, handler_id: str, kind: str) -> bytes:
        return _value(request, self._handler(handler_id).request_value(kind))

    @app.route(
        _HANDLER + "/request/<any(matches, params, headers, cookies, form):kind>/<name>", methods=_READ
    )
    def request_item(self, request: IRequest, handler_id: str, kind: str, name: str) -> bytes:
        return _value(request, self._handler(handler_id).request_value(kind, name))

    @app.route(
        _HANDLER + "/request/<any(matches, params, headers, cookies, form, files):kind>", methods=_READ
    )
    def request_collection(self, request: IRequest, handler_id: str, kind: str) -> bytes:
        collection = self._handler(handler_id).request_collection(kind)
        request.setHeader(b"Content-Type", JSON)
        return collection  # never empty: twisted.web gives its length

    @app.route(_HANDLER + "/request/body", methods=_READ)
    def request_body(self, request: IRequest, handler_id: str) -> Deferred[bytes]:
        body = self._handler(handler_id).body()
        return _send_file(request, body, body.seek(0, 2))

    @app.route(_HANDLER + "/request/files/<name>/filename", methods=_READ)
    def file_name(self, request: IRequest, handler_id: str, name: str) -> bytes:
        return _value(request, _file(self._handler(handler_id), name).filename.encode())

    @app.route(_HANDLER + "/request/files/<name>/content", methods=_READ)
    def file_content(self, request: IRequest, handler_id: str, name: str) -> Deferred[bytes]:
        upload = _file(self._handler(handler_id), name)
        return _send_file(request, upload.open(), upload.size)

    @app.route(_HANDLER + "/request/auth/user", methods=_READ)
    def auth_user(self, request: IRequest, handler_id: str) -> bytes:
        return _value(request, self._handler(handler_id).request_value("auth_user"))

    @app.route(_HANDLER + "/route/id", methods=_READ)
    def route_id(self, request: IRequest, handler_id: str) -> bytes:
        return _value(request, self._handler(handler_id).route.id.encode())

    @app.route(_HANDLER + "/ssl/client/i/dn", methods=_READ)
    def client_dn(self, request: IRequest, handler_id: str) -> bytes:
        user = self._handler(handler_id).request
        dn = peer_subject_dn(user.transport or user.channel)
        return _value(request, None if dn is None else dn.encode())

    # -- writes ---------------------------------------------------------------

    @app.route(_HANDLER + "/response/status", methods=_WRITE)
    def set_status(self, request: IRequest, handler_id: str) -> bytes:
        self._writable(handler_id).set_status(_small_value(request))
        return b""

    @app.route(_HANDLER + "/response/reason", methods=_WRITE)
    def set_reason(self, request: IRequest, handler_id: str) -> bytes:
        self._writable(handler_id).set_reason(_small_value(request))
        return b""

    @app.route(_HANDLER + "/response/headers/<name>", methods=_WRITE)
    def add_header(self, request: IRequest, handler_id: str, name: str) -> bytes:
        self._writable(handler_id).add_header(name, _small_value(request))
        return b""

    @app.route(_HANDLER + "/response/cookies/<name>", methods=_WRITE)
    def add_cookie(self, request: IRequest, handler_id: str, name: str) -> bytes:
        self._writable(handler_id).add_cookie(name, _small_value(request))
        return b""

    @app.route(_HANDLER + "/response/headers/<name>", methods=["DELETE"])
    def remove_header(self, request: IRequest, handler_id: str, name: str) -> bytes:
        self._handler(handler_id).remove_header(name)
        return b""

    @app.route(_HANDLER + "/response/cookies/<name>", methods=["DELETE"])
    def remove_cookie(self, request: IRequest, handler_id: str, name: str) -> bytes:
        self._handler(handler_id).remove_cookie(name)
        return b""

    @app.route(_HANDLER + "/response/<any(body, stream):kind>", methods=_WRITE)
    def append_body(self, request: IRequest, handler_id: str, kind: str) -> bytes | Deferred[bytes]:
        return _append(self._writable(handler_id), request.content)

    @app.route(_HANDLER + "/response/end", methods=_WRITE)
    def end(self, request: IRequest, handler_id: str) -> bytes:
        self._writable(handler_id).end()
        return b""

    @app.route(_HANDLER + "/server/log", methods=_WRITE)
    def log_line(self, request: IRequest, handler_id: str) -> bytes:
        _log_lines(self._handler(handler_id), None, _small_value(request))
        return b""

    @app.route(_HANDLER + "/server/log/<prefix>", methods=_WRITE)
    def log_line_with_prefix(self, request: IRequest, handler_id: str, prefix: str) -> bytes:
        _log_lines(self._handler(handler_id), prefix, _small_value(request))
        return b""

    # -- what is not in the tree ----------------------------------------------

    @app.handle_errors(NotFound, MethodNotAllowed)
    def refused(self, request: IRequest, failure: Failure) -> NoReturn:
        """
        A request no route answers: another method than the data API's
        (``Allow`` lists them); a resource asked with the wrong method (the
        detail names the right one); a path outside the tree (in a
        handler's, the detail naming it) or outside any handler.
        """
        if request.method not in _METHODS:
            request.setHeader(b"Allow", _ALLOWED)
            raise JSONError(405, "Method Not Allowed")
        if isinstance(failure.value, MethodNotAllowed):
            valid = sorted(failure.value.valid_methods or ())
            takes = " or ".join(method for method in valid if method != "HEAD")
            raise JSONError(
                405,
                "Method Not Allowed",
                f"{_resource(request.postpath)} takes {takes}, not {request.method.decode()}",
            )
        top, _, rest = b"/".join(request.postpath).partition(b"/")
        handler_id, _, rest = rest.partition(b"/")
        if top == b"handlers" and handler_id and rest:
            raise JSONError(*_INVALID_PATH, _not_in_tree(request.postpath))
        raise JSONError(404, "Not Found")

    install_json_errors(app)

    def _handler(self, handler_id: str) -> Handler:
        handler = self.handlers.get(handler_id)
        if handler is None:
            raise JSONError(404, "Handler ID Not Found")
        return handler

    def _writable(self, handler_id: str) -> Handler:
        """The handler, if its response may still be written."""
        handler = self._handler(handler_id)
        if handler.state is State.ENDED:
            raise JSONError(*ALREADY_ENDED)
        return handler


def _resource(postpath: list[bytes]) -> str:
    """The resource a path in a handler's names (what follows the handler id), quoted for a detail."""
    return quoted("/" + b"/".join(postpath[2:]).decode("utf-8", "replace"))


def _not_in_tree(postpath: list[bytes]) -> str:
    """The detail of a path in a handler's that is outside the tree: what it names, or its bad handler id."""
    handler_id = postpath[1]
    if b"/" in handler_id:
        return f"the handler id {quoted(handler_id.decode('utf-8', 'replace'))} holds a '/'"
    return f"{_resource(postpath)} is not a resource of the data API"


def _value(request: IRequest, value: bytes | None) -> bytes:
    """The answer of a read of one value, 404 if the item is absent."""
    if value is None:
        raise JSONError(404, "Resource Item Not Found")
    request.setHeader(b"Content-Type", OCTET_STREAM)
    if not value:  # twisted.web gives the length of an answer that has a body, even to HEAD
        request.setHeader(b"Content-Length", b"0")
    return value


def _small_value(request: IRequest) -> bytes:
    """The body of a write of a status, header, cookie, reason or log line."""
    data = request.content.read(MAX_VALUE + 1)
    if len(data) > MAX_VALUE:
        raise JSONError(
            413,
            "Request Entity Too Large",
            f"the value is over {MAX_VALUE} bytes, the most a status, reason, header, cookie or log line takes",
        )
    return data


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


def _file(handler: Handler, name: str) -> UploadedFile:
    upload = handler.form().file(name)
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
