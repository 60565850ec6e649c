"""
One control API call over pinned mutual TLS.

Requests are made with :class:`twisted.web.client.Agent` and read with treq:
treq's own request path cannot address IPv6 literals (``https://[::1]:8081``).
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from kapow.commands.control_call import refusal_reason


class ControlError(Exception):
    """The control API refused the call; ``str()`` is the server's reason."""


@inlineCallbacks
def call(
    reactor: Any,
    policy: Any,
    control_url: str,
    method: str,
    path: str,
    body: Any | None,
    expected: int,
) -> Deferred[str]:
    """
    Make one control API request and return the response body as text.

    :param policy: an ``IPolicyForHTTPS`` pinning the control server.
    :param body: JSON-serialisable request body, or ``None``.
    :param expected: the status that means success.
    :raises ControlError: with the server's reason on any other status.
    """
    from io import BytesIO

    headers = Headers()
    producer = None
    if body is not None:
        headers.addRawHeader(b"Content-Type", b"application/json")
        producer = FileBodyProducer(BytesIO(json.dumps(body).encode()))
    url = control_url.rstrip("/") + path
    agent = Agent(reactor, contextFactory=policy)
    try:
        response = yield agent.request(method.encode(), url.encode(), headers, producer)
    except Exception as e:
        raise ControlError(f"cannot reach control API at {control_url}: {_why(e)}") from e
    content = yield treq.content(response)
    if response.code != expected:
        raise ControlError(refusal_reason(content, response.code))
    return content.decode("utf-8", "replace")


def _why(e: Exception) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(_why(r.value) for r in reasons)
    return " ".join((str(e) or type(e).__name__).split())
