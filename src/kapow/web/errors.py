"""
HTTP plumbing shared by the three interfaces: JSON error bodies and a request
class that refuses oversized bodies before buffering them.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from klein import KleinRenderable

# not exported by klein: how its resource decodes a request's URL
from klein._resource import URLDecodeError, extractURLparts
from klein.resource import KleinResource
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException

if TYPE_CHECKING:
    from klein import Klein

log = Logger()

JSON_CONTENT_TYPE = b"application/json"


#: The longest ``detail`` an error carries, in characters; a longer one is cut.
MAX_DETAIL = 300


class JSONError(Exception):
    """
    An error that leaves the API as ``{"reason": ...}`` with a status code,
    and with ``"detail"`` too when the server knows more than the reason says.

    :param code: the HTTP status code.
    :param reason: the reason text; part of the contract, clients print it.
    :param detail: what was wrong, in plain words an operator acts on (which
        field, which value, what was expected); made one line, cut after
        :data:`MAX_DETAIL` characters.
    """

    def __init__(self, code: int, reason: str, detail: str | None = None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.detail = None if detail is None else one_line(detail)


def one_line(text: str) -> str:
    """``text`` with its line breaks as spaces, cut after :data:`MAX_DETAIL` characters (ending ``...``)."""
    text = " ".join(text.splitlines())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


#: Reason phrases of the statuses twisted.web has none for (it says "Unknown Status").
PHRASES = {
    103: b"Early Hints",
    421: b"Misdirected Request",
    422: b"Unprocessable Content",
    425: b"Too Early",
    426: b"Upgrade Required",
    428: b"Precondition Required",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    451: b"Unavailable For Legal Reasons",
    511: b"Network Authentication Required",
}


def phrase(code: int) -> bytes | None:
    """The reason phrase of ``code`` when twisted.web has none; ``None`` lets twisted.web choose."""
    return PHRASES.get(code)


def json_body(request: IRequest, code: int, value: object, phrase: bytes | None = None) -> bytes:
    """
    Set ``code`` and the JSON content type on ``request`` and return the
    encoded ``value``.

    :param phrase: the status line's reason phrase; the standard one by default.
    """
    request.setResponseCode(code, phrase)
    request.setHeader(b"Content-Type", JSON_CONTENT_TYPE)
    return json.dumps(value).encode("utf-8")


def reason_body(request: IRequest, code: int, reason: str, detail: str | None = None) -> bytes:
    """
    The contract's error shape: ``{"reason": reason}`` with ``code``, and
    the reason as the status line's reason phrase (see the data API
    reference, docs/reference/data-api.rst).

    :param detail: added as ``"detail"`` when given (after ``reason``, which
        clients look for first).
    """
    return json_body(request, code, _error(reason, detail), reason.encode("utf-8"))


def _error(reason: str, detail: str | None) -> dict[str, str]:
    """The JSON object of an error."""
    return {"reason": reason} if detail is None else {"reason": reason, "detail": detail}


def closing_answer(code: int, reason: str, detail: str | None = None) -> bytes:
    """
    A whole HTTP/1.1 error answer in the contract's shape (as
    :func:`reason_body` makes one), to write straight to a connection that
    closes after it: where no request is there to answer through.
    """
    body = json.dumps(_error(reason, detail)).encode()
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (code, reason.encode(), len(body), body)
    )


def install_json_errors(app: Klein) -> None:
    """
    Make every error that leaves ``app`` a JSON ``{"reason": ...}`` body:
    ours (:class:`JSONError`, with its ``detail``), routing errors from
    werkzeug (404, 405) and anything unexpected (500, logged with its
    traceback, never sent).

    :param app: the :class:`klein.Klein` application of a class (``app =
        Klein()`` as a class attribute, so its handlers are given the
        instance first); call this after its routes are defined.
    """

    # ``self`` is the app's owner, named as Klein's KleinErrorMethod names it.
    @app.handle_errors(JSONError)
    def _ours(self: object, request: IRequest, failure: Failure) -> bytes:
        exc = failure.value
        assert isinstance(exc, JSONError)
        return reason_body(request, exc.code, exc.reason, exc.detail)

    @app.handle_errors(HTTPException)
    def _routing(self: object, request: IRequest, failure: Failure) -> bytes:
        exc = failure.value
        assert isinstance(exc, HTTPException) and exc.code is not None
        valid_methods = getattr(exc, "valid_methods", None)
        if exc.code == 405 and valid_methods:
            request.setHeader(b"Allow", ", ".join(valid_methods).encode())
        return reason_body(request, exc.code, _REASONS.get(exc.code, exc.name))

    @app.handle_errors(Exception)
    def _unexpected(self: object, request: IRequest, failure: Failure) -> bytes:
        log.failure("Unhandled error answering {uri}", failure, uri=request.uri)
        return reason_body(request, 500, "Internal Server Error")


_REASONS = {404: "Not Found", 405: "Method Not Allowed"}


def json_resource(app: Klein, bad_url: JSONError) -> IResource:
    """
    The resource of ``app`` (bound to its owner, as ``self.app`` gives it),
    answering a URL that werkzeug cannot route, because its path or host is
    not UTF-8 once percent-decoded, with ``bad_url`` as JSON instead of
    Klein's ``text/html`` page.
    """
    return _JSONKleinResource(app, bad_url)


class _JSONKleinResource(KleinResource):
    def __init__(self, app: Klein, bad_url: JSONError) -> None:
        super().__init__(app)
        self._bad_url = bad_url

    def render(self, request: IRequest) -> KleinRenderable:
        try:
            extractURLparts(request)
        except URLDecodeError:
            bad = self._bad_url
            return reason_body(request, bad.code, bad.reason, bad.detail)
        return super().render(request)


def bounded_request_factory(max_body: int) -> type[Request]:
    """
    A :class:`~twisted.web.server.Request` class that answers 413 and closes
    the connection as soon as a body is known to exceed ``max_body`` bytes
    (from ``Content-Length``, or while a chunked body arrives), instead of
    buffering it.

    :param max_body: the largest request body accepted, in bytes.
    """

    class BoundedRequest(Request):
        _refused = False
        _received = 0

        def gotLength(self, length: int | None) -> None:
            if length is not None and length > max_body:
                self._refuse()
            super().gotLength(length)

        def handleContentChunk(self, data: bytes) -> None:
            if self._refused:
                return
            self._received += len(data)
            if self._received > max_body:
                self._refuse()
                return
            super().handleContentChunk(data)

        def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
            if not self._refused:
                super().requestReceived(command, path, version)

        def _refuse(self) -> None:
            self._refused = True
            transport = self.channel.transport
            assert transport is not None  # the body is arriving on it
            transport.write(
                closing_answer(413, "Request Entity Too Large", f"the body is over {max_body} bytes")
            )
            self.channel.loseConnection()

    return BoundedRequest


class QuietSite(Site):
    """
    A site that writes no access log: the data API answers several calls per
    user request, and the user interface's access log already accounts for
    each of those requests by handler id.
    """

    noisy = False

    def log(self, request: http.Request) -> None:
        pass
