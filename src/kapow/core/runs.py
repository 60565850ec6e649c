"""
Run records (SPEC.md §12): what every handler that started a process leaves
when it ends, and the queries of ``GET /history`` that find them. Plain
values, no Twisted: the server builds records, :mod:`kapow.history` keeps
them, the control API and ``kapow history`` show them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kapow.core.messages import quoted

__all__ = [
    "DEFAULT_KEEP",
    "DEFAULT_LIMIT",
    "FIELDS",
    "MAX_LIMIT",
    "OUTCOMES",
    "HistoryQuery",
    "InvalidQuery",
    "JobResult",
    "RunRecord",
    "parse_query",
    "parse_time",
    "rfc3339",
    "shown",
]

#: How a run ended, as the metrics count it.
OUTCOMES = ("ok", "error", "signal", "timeout", "disconnect", "killed")

#: The fields of every run record, in the order they are shown.
FIELDS = (
    "id",
    "route_id",
    "pattern",
    "method",
    "path",
    "remote",
    "started",
    "duration_s",
    "status",
    "outcome",
    "exit_status",
    "signal",
    "bytes_in",
    "bytes_out",
    "mode",
    "job",
)

#: Records kept when ``--history-keep`` is not given.
DEFAULT_KEEP = 10_000
#: Records ``GET /history`` answers when the query sets no ``limit``, and the most it may set.
DEFAULT_LIMIT, MAX_LIMIT = 100, 10_000

#: A run record as JSON: :data:`FIELDS`, ``server`` (the ``--server-name``
#: of the server that ran it), and for a job ``stderr_tail`` (and
#: ``truncated`` once it is known) and ``_guard`` (its route's ``auth``,
#: kept for the servers of a cluster, never shown: :func:`shown`);
#: ``started`` is RFC 3339 UTC text.
RunRecord = dict[str, Any]


@dataclass(frozen=True)
class JobResult:
    """
    What a job's process answered (SPEC.md §12 "Jobs"), kept to be served by
    ``GET /_jobs/{id}/result``: the status line, the headers as sent (raw
    names and values), the body up to ``job_output_max`` bytes, and whether
    it was cut there.
    """

    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    truncated: bool


class InvalidQuery(ValueError):
    """A query value of ``GET /history`` is not valid; ``str()`` says which."""


def shown(record: RunRecord) -> RunRecord:
    """A record as clients see it: without the fields the server keeps for itself (``_guard``)."""
    return {name: value for name, value in record.items() if not name.startswith("_")}


def rfc3339(seconds: float) -> str:
    """``seconds`` since the epoch as RFC 3339 UTC text, to the millisecond."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """
    RFC 3339 text (``2026-12-07T10:00:00Z``, an offset, or fractions of a
    second) as seconds since the epoch.

    :raises InvalidQuery: if it is not such a time, or has no zone.
    """
    value = text.strip()
    if value[-1:] in ("z", "Z"):
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidQuery(f"not an RFC 3339 time: {text!r}") from None
    if moment.tzinfo is None or "T" not in value.upper():
        raise InvalidQuery(f"not an RFC 3339 time with a zone: {text!r}")
    return moment.timestamp()


@dataclass(frozen=True)
class HistoryQuery:
    """
    What ``GET /history`` asks for: the newest :attr:`limit` records of
    route :attr:`route_id` (any if ``None``) with :attr:`outcome` (any if
    ``None``) that started at or after :attr:`since` (seconds since the
    epoch; any if ``None``).
    """

    route_id: str | None = None
    outcome: str | None = None
    since: float | None = None
    limit: int = DEFAULT_LIMIT

    def __post_init__(self) -> None:
        if self.outcome is not None and self.outcome not in OUTCOMES:
            raise InvalidQuery(f"outcome must be one of {', '.join(OUTCOMES)}, not {quoted(self.outcome)}")
        if (
            isinstance(self.limit, bool)
            or not isinstance(self.limit, int)
            or not 1 <= self.limit <= MAX_LIMIT
        ):
            raise InvalidQuery(
                f"limit must be a whole number from 1 to {MAX_LIMIT}, not {quoted(self.limit)}"
            )
        if self.since is not None and not math.isfinite(self.since):
            raise InvalidQuery("since must be a time")

    def to_args(self) -> dict[str, str]:
        """The query as the parameters of ``GET /history``."""
        args = {"limit": str(self.limit)}
        if self.route_id is not None:
            args["route_id"] = self.route_id
        if self.outcome is not None:
            args["outcome"] = self.outcome
        if self.since is not None:
            args["since"] = rfc3339(self.since)
        return args


#: The parameters ``GET /history`` takes.
QUERY_NAMES = ("route_id", "outcome", "since", "limit")


def parse_query(args: Mapping[str, Sequence[str]]) -> HistoryQuery:
    """
    The query of ``GET /history``'s parameters (each name to its values, the
    first of which counts; other names are ignored, as the control API
    ignores unknown JSON keys).

    :raises InvalidQuery: for a value that is not valid.
    """
    first = {name: values[0] for name, values in args.items() if name in QUERY_NAMES and values}
    limit = DEFAULT_LIMIT
    if "limit" in first:
        text = first["limit"].strip()
        # checked here, not only by the query, to name the text as it was given
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
            raise InvalidQuery(
                f"limit must be a whole number from 1 to {MAX_LIMIT}, not {quoted(first['limit'])}"
            )
        limit = int(text)
    since = None
    if "since" in first:
        try:
            since = parse_time(first["since"])
        except InvalidQuery:
            raise InvalidQuery(
                f"since must be an RFC 3339 time with a zone (2026-12-07T10:00:00Z), not {quoted(first['since'])}"
            ) from None
    outcome = first.get("outcome") or None
    route_id = first.get("route_id") or None
    return HistoryQuery(route_id=route_id, outcome=outcome, since=since, limit=limit)
