# -*- test-case-name: tests.unit.test_data_api,tests.unit.test_data_app_wire -*-
"""
How the data app is served (:class:`DataResource`): its Klein routes and
error handlers, with less work per call than Klein's own resource does.

A handler makes several data calls for every request it answers, so what
the server spends on one call shows in every request. Klein's resource binds
the app's werkzeug map to each request, calls the endpoint and then the
writing of its answer through a chain of Deferreds, and writes the answer
itself (chunked, lacking a length). This one, for an app whose routes do
not depend on the host and all start with the same argument (the handler
id):

- binds the map once, and looks the route of a path up once for all values
  of that argument (werkzeug's routing was a third of a call's CPU time,
  and a handler's program makes the same calls for every request);
- calls the endpoint directly and hands a ``bytes`` answer to twisted.web,
  which frames it as any leaf resource's (``Content-Length``, and only the
  headers for ``HEAD``); a Deferred answer is written when it fires, and is
  not cancelled when the caller goes away (a body write it carries still
  reaches the user's response);
- passes every error to the app's error handlers, in order, as Klein does.

Before routing it refuses what werkzeug would route otherwise than it was
sent: a method that no route has (werkzeug compares methods without their
case), a path whose percent-escapes do not decode to UTF-8 (with
``bad_url``, like :func:`kapow.web.errors.json_resource`) and a path that
starts with an empty segment (werkzeug strips leading slashes).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, cast

from klein import Klein
from klein.resource import KleinResource
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Rule

from kapow.web.errors import JSONError, reason_body

__all__ = ["DataResource"]

log = Logger()

#: Paths and methods whose routes a :class:`DataResource` keeps, and the
#: longest path kept (after the prefix).
ROUTES_KEPT = 1024
KEPT_LENGTH = 256
_BROKEN_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_PREFIX = re.compile(r"/(\w+)/<(\w+)>")
_UNHANDLED = "Unhandled error answering {uri}"
#: What the app's endpoints and error handlers answer.
_Answer = bytes | Deferred[bytes]


class DataResource(KleinResource):
    """
    The resource of a Klein app (bound to its owner, as ``self.app`` gives
    it) whose routes do not depend on the host, whose endpoints answer
    ``bytes`` or a Deferred of them, and whose error handlers answer at once.

    :param bad_url: the code and reason of the answer to a path that does
        not decode (with a detail saying why).
    :param prefix: how every route's path starts: one segment, then an
        argument that takes any one segment (``/handlers/<handler_id>``).
        The route of a path is looked up once for all values of that
        argument, then kept (:data:`ROUTES_KEPT` paths and methods, the
        least recently used forgotten first).
    """

    def __init__(self, app: Klein, bad_url: JSONError, prefix: str) -> None:
        super().__init__(app)
        self._bad_url = bad_url
        self._routes = app.url_map.bind("")
        rules = list(app.url_map.iter_rules())
        #: the methods the routes answer (none if one route answers any)
        self._methods: frozenset[bytes] | None = None
        if all(rule.methods for rule in rules):
            self._methods = frozenset(method.encode() for rule in rules for method in rule.methods or ())
        shape = _PREFIX.fullmatch(prefix)
        if shape is None or not all(rule.rule.startswith(prefix + "/") for rule in rules):
            raise ValueError(f"not every route starts with {prefix}")
        self._top = shape[1]
        self._argument = shape[2]
        self._route = functools.lru_cache(ROUTES_KEPT)(self._route_of)

    def render(self, request: IRequest) -> bytes | int:  # type: ignore[override]  # IResource.render's: bytes, or NOT_DONE_YET (an int), as Klein's own returns
        try:
            answer = self._answer(request)
        except Exception:
            answer = self._failed(request, Failure())
        if isinstance(answer, Deferred):
            answer.addErrback(lambda failure: self._failed(request, failure))
            answer.addCallback(lambda body: _finish(request, body))
            answer.addErrback(lambda failure: log.failure(_UNHANDLED, failure, uri=request.uri))
            return NOT_DONE_YET
        return answer

    def _answer(self, request: IRequest) -> _Answer:
        """What the endpoint ``request`` is routed to answers."""
        method = request.method
        if self._methods is not None and method not in self._methods:
            raise MethodNotAllowed(valid_methods=sorted(m.decode() for m in self._methods))
        if b"%" in request.path and _BROKEN_ESCAPE.search(request.path):
            raise self._bad_path("the path has a '%' that is not followed by two hexadecimal digits")
        try:
            path = "/" + b"/".join(request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            raise self._bad_path("the path is not UTF-8 once percent-decoded") from None
        if path.startswith("//"):
            raise NotFound()
        parts = path.split("/", 3)
        if len(parts) == 4 and parts[1] == self._top and parts[2] and len(parts[3]) <= KEPT_LENGTH:
            # every route takes this segment whatever it holds: one lookup for all
            rule, arguments = self._route(method, parts[3])
            arguments = {**arguments, self._argument: parts[2]}
        else:
            rule, arguments = self._match(path, method)
        return cast(_Answer, self._app.execute_endpoint(rule.endpoint, request, **arguments))

    def _bad_path(self, detail: str) -> JSONError:
        """The error of a path that does not decode, saying why."""
        return JSONError(self._bad_url.code, self._bad_url.reason, detail)

    def _route_of(self, method: bytes, rest: str) -> tuple[Rule, Mapping[str, Any]]:
        """The route of a path that is ``rest`` after the prefix (its argument a stand-in)."""
        return self._match(f"/{self._top}/-/{rest}", method)

    def _match(self, path: str, method: bytes) -> tuple[Rule, Mapping[str, Any]]:
        """The route of ``path`` and its arguments: werkzeug's routing."""
        return self._routes.match(path, method.decode(), return_rule=True)

    def _failed(self, request: IRequest, failure: Failure) -> _Answer:
        """The answer of the app's first error handler for ``failure`` that does not fail itself."""
        for kinds, handler in self._app._error_handlers:  # Klein's own resource reads them so
            if failure.check(*kinds):
                try:
                    answer = cast(_Answer, self._app.execute_error_handler(handler, request, failure))
                except Exception:
                    failure = Failure()
                else:
                    return answer
        log.failure(_UNHANDLED, failure, uri=request.uri)
        return reason_body(request, 500, "Internal Server Error")


def _finish(request: IRequest, body: bytes) -> None:
    """Write ``body``, the answer of a Deferred, and finish (unless the caller is gone)."""
    if request.finished or request._disconnected:  # type: ignore[attr-defined]  # Request's, not in IRequest
        return
    if body:
        request.write(body)
    elif not request.startedWriting:  # type: ignore[attr-defined]  # Request's, not in IRequest
        # as a value answered at once: no content, no type
        request.setHeader(b"Content-Length", b"0")
    request.finish()
