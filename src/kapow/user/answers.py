# -*- test-case-name: tests.unit.test_user_api -*-
"""
What the user interface answers a request with, when a handler does not:
short plain-text bodies (the user's clients are not Kapow's, so never
JSON), now or later.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from kapow.web.errors import phrase

__all__ = ["Answer", "Later", "internal_error", "plain", "settle"]

#: An answer to come: a body, or ``None`` (see :data:`Answer`).
Later = Deferred[bytes | None]

#: The answer to a request: a body now, one to come, or ``None``: none from
#: the user interface, because the request is its handler's now (which
#: completes the response when its process exits), or its client left.
Answer = bytes | Later | None


def plain(request: IRequest, code: int, body: bytes) -> bytes:
    """Set ``code`` and the plain-text content type on ``request`` and return ``body``."""
    request.setResponseCode(code, phrase(code))
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    return body


def internal_error(request: IRequest) -> bytes:
    """The answer of a request that failed inside the server."""
    return plain(request, 500, b"Internal Server Error\n")


def settle(later: Later, answer: Answer) -> None:
    """Fire ``later`` with ``answer``, now or once it is there."""
    if isinstance(answer, Deferred):
        answer.chainDeferred(later)
    else:
        later.callback(answer)
