"""
The messages between the main process and its workers (``--workers N``,
docs/howto/scale-out.rst).

Both sides import the commands from here, and nothing else crosses the
connection: routes travel as their JSON form (:meth:`kapow.core.routes.Route.to_json`),
never pickled. The connection is one end of a ``socketpair`` that the main
process hands to each worker as descriptor :data:`MAIN_FD`, next to the
listening socket of the user interface as :data:`USER_FD` and the socket
that connections to ``--data-bind`` come over as :data:`DATA_FD`
(:mod:`kapow.data.handoff`).

Main to worker: :class:`Routes` (the whole table), :class:`Serve` (start
accepting), :class:`Running`, :class:`MetricsPart`,
:class:`Reload`, :class:`Stop`, and :class:`Handlers`,
:class:`HandlerInfo`, :class:`Kill` for the control API. Worker to main:
:class:`Admit`, :class:`Withdraw` and :class:`Release`, for the limits and
queues that must hold across workers; :class:`RunRecords`, for the
history the main process alone writes; and the jobs, which the main process
keeps: :class:`JobStarted`, :class:`JobBody`, :class:`JobDone` as they run,
:class:`JobStatus` and :class:`JobResultPart` when a client asks; and
:class:`TakeToken`, for the routes' rate limits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ServerFactory
from twisted.protocols import amp

from kapow.handlers.handler import handler_ids

#: The worker's descriptor of the user interface's listening socket.
USER_FD = 3
#: The worker's descriptor of its connection to the main process.
MAIN_FD = 4
#: The worker's descriptor of the socket connections to ``--data-bind`` come over.
DATA_FD = 5

_HANDLER_ID = re.compile(r"[0-9a-f]{32}")

#: Largest part of the route table in one :class:`Routes` message (an AMP
#: value holds at most 65,535 bytes).
ROUTES_PART = 60_000


class Routes(amp.Command):
    """
    A part of the whole route table's JSON text (a list of routes in table
    order); the worker replaces its table once the ``last`` part arrived.
    """

    arguments = [(b"part", amp.String()), (b"last", amp.Boolean())]


class Serve(amp.Command):
    """Start accepting users' connections; answers once the worker does."""

    arguments = [(b"control_url", amp.Unicode())]
    response = [(b"data_url", amp.Unicode())]


class Running(amp.Command):
    """How many handler processes the worker runs."""

    response = [(b"handlers", amp.Integer())]


class MetricsPart(amp.Command):
    """
    Part ``part`` of the worker's metrics snapshot as JSON text
    (:meth:`kapow.core.metrics.Metrics.snapshot`); part 0 takes a new snapshot,
    ``parts`` says how many there are.
    """

    arguments = [(b"part", amp.Integer())]
    response = [(b"text", amp.Unicode()), (b"parts", amp.Integer())]


class Reload(amp.Command):
    """Read the certificates and the routes' auth files again, as ``SIGHUP`` does."""

    requiresAnswer = False


class Stop(amp.Command):
    """Stop gracefully, as the main process does; ``now``: end the handlers at once."""

    arguments = [(b"now", amp.Boolean())]
    requiresAnswer = False


#: Largest JSON text of handlers in one answer of :class:`Handlers`.
HANDLERS_PART = 60_000


class Admit(amp.Command):
    """
    May a handler of route ``route_id`` start? ``limit`` is the route's
    ``max_concurrency`` (absent: none), with a queue of ``queue`` waiting up
    to ``queue_timeout`` seconds; the main process also applies
    ``--max-handlers`` and its queue. Answered when the handler may start
    (``refusal`` absent) or is refused, which may be after it waited in a
    queue; ``ticket``, unique on the worker's connection, names it for
    :class:`Withdraw` meanwhile.
    """

    arguments = [
        (b"route_id", amp.Unicode()),
        (b"limit", amp.Integer(optional=True)),
        (b"queue", amp.Integer(optional=True)),
        (b"queue_timeout", amp.Float(optional=True)),
        (b"ticket", amp.Integer(optional=True)),
    ]
    response = [(b"refusal", amp.Unicode(optional=True))]


class Withdraw(amp.Command):
    """The request of an :class:`Admit` still waiting in a queue no longer wants a slot."""

    arguments = [(b"ticket", amp.Integer())]
    requiresAnswer = False


class Release(amp.Command):
    """A handler :class:`Admit` let start has exited."""

    arguments = [(b"route_id", amp.Unicode()), (b"limited", amp.Boolean())]
    requiresAnswer = False


#: Largest batch of run records in one :class:`RunRecords` message, in characters.
RECORDS_PART = 60_000


class RunRecords(amp.Command):
    """Run records of the worker's handlers (a JSON list), for the history."""

    arguments = [(b"records", amp.Unicode())]
    requiresAnswer = False


class TakeToken(amp.Command):
    """
    Take a token of a rated route's bucket for ``key``: ``wait`` is 0 if it
    was taken, else the seconds until the next one (the main process keeps
    every bucket, so that a rate holds across the workers).
    """

    arguments = [(b"route_id", amp.Unicode()), (b"rate", amp.Unicode()), (b"key", amp.Unicode())]
    response = [(b"wait", amp.Float())]


#: Largest part of a job's body in one message.
BODY_PART = 60_000


class JobStarted(amp.Command):
    """A job of the worker is ``queued`` or ``running``: its record so far (JSON)."""

    arguments = [(b"record", amp.Unicode()), (b"state", amp.Unicode())]
    requiresAnswer = False


class JobBody(amp.Command):
    """A part of a finished job's kept body, before its :class:`JobDone`."""

    arguments = [(b"id", amp.Unicode()), (b"part", amp.String())]
    requiresAnswer = False


class JobDone(amp.Command):
    """A job of the worker is over: its record (JSON) and kept response, its body sent before in parts."""

    arguments = [
        (b"record", amp.Unicode()),
        (b"status", amp.Integer()),
        (b"reason", amp.Unicode()),
        (b"headers", amp.Unicode()),
        (b"truncated", amp.Boolean()),
    ]
    requiresAnswer = False


class JobStatus(amp.Command):
    """The state and record (JSON) of a job; ``found`` false if it is unknown."""

    arguments = [(b"id", amp.Unicode())]
    response = [(b"found", amp.Boolean()), (b"state", amp.Unicode()), (b"record", amp.Unicode())]


class JobResultPart(amp.Command):
    """
    Part ``part`` of a finished job's kept response: its status line and
    headers (JSON) and that part of its body; ``parts`` says how many there
    are, ``found`` false if it has none.
    """

    arguments = [(b"id", amp.Unicode()), (b"part", amp.Integer())]
    response = [
        (b"found", amp.Boolean()),
        (b"status", amp.Integer()),
        (b"reason", amp.Unicode()),
        (b"headers", amp.Unicode()),
        (b"truncated", amp.Boolean()),
        (b"body", amp.String()),
        (b"parts", amp.Integer()),
    ]


def headers_text(headers: list[tuple[bytes, bytes]]) -> str:
    """A job's kept headers as JSON text (latin-1 keeps every byte)."""
    return json.dumps([[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers])


def headers_of(text: str) -> list[tuple[bytes, bytes]]:
    """The headers :func:`headers_text` wrote."""
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in json.loads(text)]


class Handlers(amp.Command):
    """
    The worker's live handlers with an id after ``after`` (in id order), as
    a JSON list of at most :data:`HANDLERS_PART` bytes (at least one
    handler, if there is one); ``more``: ask again after the last of them.
    """

    arguments = [(b"after", amp.Unicode())]
    response = [(b"handlers", amp.String()), (b"more", amp.Boolean())]


class HandlerInfo(amp.Command):
    """One live handler of the worker as JSON, absent if there is none."""

    arguments = [(b"handler_id", amp.Unicode())]
    response = [(b"handler", amp.String(optional=True))]


class Kill(amp.Command):
    """End a live handler of the worker (as ``DELETE /handlers/{id}``); whether there was one."""

    arguments = [(b"handler_id", amp.Unicode())]
    response = [(b"killed", amp.Boolean())]


def handlers_page(handlers: list[dict[str, Any]], after: str) -> tuple[bytes, bool]:
    """The answer of :class:`Handlers` from every live handler of a worker."""
    rest = sorted((h for h in handlers if h["id"] > after), key=lambda h: h["id"])
    parts: list[bytes] = []
    size = 2
    for n, handler in enumerate(rest):
        text = json.dumps(handler).encode()
        if parts and size + len(text) + 1 > HANDLERS_PART:
            return b"[" + b",".join(parts) + b"]", n < len(rest)
        parts.append(text)
        size += len(text) + 1
    return b"[" + b",".join(parts) + b"]", False


def table_parts(text: bytes) -> list[bytes]:
    """``text`` cut into parts of at most :data:`ROUTES_PART` bytes (at least one)."""
    return [text[i : i + ROUTES_PART] for i in range(0, len(text), ROUTES_PART)] or [b""]


def worker_handler_ids(number: int) -> Callable[[], str]:
    """
    Makes the handler ids of worker ``number``: as unguessable as any (112
    random bits), with the worker's number in their first four hex digits,
    so the main process knows which worker to hand their data API calls to.
    """
    return handler_ids(f"{number:04x}")


def handler_worker(handler_id: str) -> int | None:
    """The number of the worker whose :func:`worker_handler_ids` made this id, if one did."""
    if _HANDLER_ID.fullmatch(handler_id) is None:
        return None
    return int(handler_id[:4], 16)


class _Connecting(ServerFactory):
    def __init__(self, link: amp.AMP) -> None:
        self.link = link

    def buildProtocol(self, addr: IAddress | None) -> amp.AMP:
        return self.link


def link_factory(link: amp.AMP) -> ServerFactory:
    """The factory that connects ``link`` to the end of the ``socketpair`` adopted for it."""
    return _Connecting(link)
