"""
A live handler of the user interface as the control API shows it: "The
handler object" of docs/reference/control-api.rst.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from twisted.web.server import Request

from kapow.core.runs import rfc3339
from kapow.handlers.handler import State
from kapow.handlers.listing import HandlerShown

__all__ = ["STATES", "handler_object"]

#: The ``state`` the control API shows for each state of a handler's response.
STATES = {State.PENDING: "running", State.STREAMING: "streaming", State.ENDED: "ended"}


def handler_object(
    handler_id: str, route_id: str, request: Request, pid: int | None, started: float, state: str
) -> HandlerShown:
    """
    The handler object of the handler ``handler_id`` of route ``route_id``.

    :param request: the user's request it answers.
    :param pid: its process (group) id; ``None`` while it is queued.
    :param started: when its process started, or when it was queued, in
        seconds since the epoch.
    :param state: ``queued``, or one of :data:`STATES`.
    """
    return {
        "id": handler_id,
        "route_id": route_id,
        "method": request.method.decode("latin-1"),
        "path": unquote_to_bytes(request.path).decode("utf-8", "replace"),
        "remote": getattr(request.getClientAddress(), "host", ""),
        "pid": pid,
        "started": rfc3339(started),
        "state": state,
    }
