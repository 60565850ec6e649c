# -*- test-case-name: tests.unit.test_user_api -*-
"""
The run record a handler leaves when its process has ended (SPEC.md §12):
built from its request, its response and how its process ended, for the
history.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from twisted.web.server import Request

from kapow.core.routes import Route
from kapow.core.runs import RunRecord, rfc3339
from kapow.handlers.handler import Handler

__all__ = ["described", "outcome_of", "run_record"]


def outcome_of(handler: Handler, status: int | None, signal: int | None) -> str:
    """How the run of ``handler`` ended, as the metrics and the history name it."""
    return handler.ended_by or ("signal" if signal is not None else "error" if status else "ok")


def described(route: Route, request: Request, run_id: str, started: float, server: str) -> RunRecord:
    """What every record says of its request and its route, before how the run went."""
    return {
        "id": run_id,
        "route_id": route.id,
        "pattern": route.url_pattern,
        "method": request.method.decode("latin-1"),
        "path": unquote_to_bytes(request.path).decode("utf-8", "replace"),
        "remote": getattr(request.getClientAddress(), "host", ""),
        "started": rfc3339(started),
        "server": server,
    }


def run_record(
    handler: Handler, started: float, duration: float, status: int | None, signal: int | None, server: str
) -> RunRecord:
    """
    The record of ``handler``'s run, once its response is complete (or cut).

    :param started: when its process started, in seconds since the epoch.
    :param duration: how long it ran, in seconds.
    :param status: its exit status, if it exited.
    :param signal: the signal that ended it, if one did.
    :param server: the name of the server that ran it (``--server-name``).
    """
    request, route = handler.request, handler.route
    started_answer = request.startedWriting or getattr(request, "kapow_upgraded", False)
    sent: int | None = request.code if started_answer else None
    stream = handler.stream
    return {
        **described(route, request, handler.id, started, server),
        "duration_s": round(duration, 6),
        "status": sent,
        "outcome": outcome_of(handler, status, signal),
        "exit_status": status,
        "signal": signal,
        "bytes_in": handler.body_size,
        "bytes_out": getattr(stream, "sent_bytes", None) or request.sentLength,
        "mode": route.mode or "http",
        "job": False,
    }
