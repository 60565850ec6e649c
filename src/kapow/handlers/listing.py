"""
What the control API needs of whatever runs the handlers, to list, show and
kill them (``/handlers``, docs/reference/control-api.rst): the user
interface of a server of one process, a server's workers, or nothing.

It lives here, beside the handlers, so that the control interface and those
that implement it see it without importing one another.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred

__all__ = ["HandlerShown", "HandlersListing"]

#: One live handler as the control API shows it (its JSON object: ``id``,
#: ``route_id``, ``method``, ``path``, ``remote``, ``pid``, ``started``, ``state``).
HandlerShown = dict[str, Any]


class HandlersListing(Protocol):
    """The live handlers of a server, each call answered at once or later."""

    def listing(self) -> list[HandlerShown] | Deferred[list[HandlerShown]]:
        """Every live handler, queued or running, oldest first."""

    def handler_info(self, handler_id: str) -> HandlerShown | Deferred[HandlerShown | None] | None:
        """One live handler, or ``None`` if there is no such handler."""

    def kill(self, handler_id: str) -> bool | Deferred[bool]:
        """End a live handler; whether there was one."""
