"""
``kapow history``: the runs a server's handlers left (SPEC.md §12), as a
table or as JSON.

See the command line reference (docs/reference/cli.rst) and the control API
reference (docs/reference/control-api.rst) for the calls it makes
(``GET /history``, ``GET /history/{id}``).  Like ``kapow route`` it runs on
the standard library only (:mod:`kapow.commands.control`).  Only what
argparse cannot parse (``--limit abc``, an ``--outcome`` that is none of
:data:`~kapow.core.runs.OUTCOMES`, a ``--since`` that is not RFC 3339) is
refused here; whether a value is in range is the server's to say.

:mod:`kapow.core.runs` is imported only when an ``--outcome`` or a
``--since`` is checked or the help is shown: with :mod:`dataclasses`,
:mod:`typing` and :mod:`datetime` it takes longer to import than the rest of
this command.
"""

from __future__ import annotations

import argparse
import json

from kapow.commands.control import CommandError, Formatter, Parser, as_printed, common_options, quote, run

# typing.TYPE_CHECKING without importing typing, which this command needs
# only for annotations; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from kapow.commands.control import ControlRequest

EPILOG = """\
examples:
  kapow history
  kapow history --outcome error --since 2026-12-07T00:00:00Z
  kapow history --route "$ROUTE_ID" --limit 10 --json | jq -r '.[].id'
  kapow history 7f1c0b2e9d8a4c3b2a1f0e9d8c7b6a59
"""

#: The table's columns: (heading, right-aligned).
COLUMNS = (
    ("STARTED", False),
    ("DURATION", True),
    ("STATUS", True),
    ("OUTCOME", False),
    ("METHOD", False),
    ("PATH", False),
    ("ID", False),
)
#: A longer path is cut to this many characters, ``...`` included.
PATH_WIDTH = 60
#: What the table shows for a null (or missing) value.
NONE = "-"


def _parser() -> Parser:
    parser = Parser(
        prog="kapow history",
        parents=[common_options()],
        description="Show the runs that the handlers of a running server left, newest first,\n"
        "over its control API (mutual TLS): a table, or JSON with --json.\n"
        "With ID, print that one run record as JSON.",
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    parser.add_argument("--route", metavar="ID", help="only the runs of this route")
    parser.add_argument(
        "--outcome",
        choices=_Outcomes(),
        metavar="OUTCOME",  # given, argparse does not read the choices to make one
        help="only the runs that ended so: %(choices)s",
    )
    parser.add_argument(
        "--since",
        type=_time,
        metavar="TIME",
        help="only the runs started at or after TIME, RFC 3339 (2026-12-07T00:00:00Z)",
    )
    parser.add_argument(
        "--limit", type=int, metavar="N", help="at most N runs, the newest [the server's default]"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON list the server answers")
    parser.add_argument("run_id", metavar="ID", nargs="?", help="print this one run record as JSON")
    return parser


class _Outcomes:
    """:data:`kapow.core.runs.OUTCOMES` as the choices of ``--outcome``, read when argparse checks or shows them."""

    def __contains__(self, value: object) -> bool:
        from kapow.core.runs import OUTCOMES

        return value in OUTCOMES

    def __iter__(self) -> Iterator[str]:
        from kapow.core.runs import OUTCOMES

        return iter(OUTCOMES)


def _time(text: str) -> str:
    """``text`` as it is, once :func:`~kapow.core.runs.parse_time` read it as an RFC 3339 time."""
    from kapow.core.runs import InvalidQuery, parse_time

    try:
        parse_time(text)
    except InvalidQuery as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.run_id is not None:
        given = [
            flag
            for flag, value in (
                ("--route", args.route),
                ("--outcome", args.outcome),
                ("--since", args.since),
                ("--limit", args.limit),
            )
            if value is not None
        ]
        if given:
            parser.error(f"ID takes no {', '.join(given)}")
        if not args.run_id:
            parser.error("ID is empty")
    return args


def _request(args: argparse.Namespace) -> ControlRequest:
    """(``args``, method, path with its query, no body, expected status) for ``args``."""
    if args.run_id is not None:
        return args, "GET", "/history/" + quote(args.run_id), None, 200
    query = [
        (name, value)
        for name, value in (
            ("route_id", args.route),
            ("outcome", args.outcome),
            ("since", args.since),
            ("limit", None if args.limit is None else str(args.limit)),
        )
        if value is not None
    ]
    path = "/history"
    if query:
        path += "?" + "&".join(f"{name}={quote(value)}" for name, value in query)
    return args, "GET", path, None, 200


def shown(value: object, width: int | None = None) -> str:
    """``value`` as a table cell: ``-`` for null, each character that is not printable
    escaped (``\\n``, ``\\x1b``, ``\\u202e``) so that none reaches the terminal, and
    cut to ``width`` characters, ``...`` included, when it is longer."""
    if value is None:
        return NONE
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and (width is None or len(text) <= width):
        return text
    pieces = [char if char.isprintable() else repr(char)[1:-1] for char in text]
    if width is None or sum(map(len, pieces)) <= width:
        return "".join(pieces)
    kept, size = [], 0
    for piece in pieces:  # cut between characters, never inside an escape
        if size + len(piece) > width - 3:
            break
        kept.append(piece)
        size += len(piece)
    return "".join(kept) + "..."


def _duration(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.3f}s"
    return shown(value)


def table(records: Sequence[object]) -> str:
    """The run records as a table: a heading line, then a line a record, columns aligned with spaces."""
    rows = [[heading for heading, _ in COLUMNS]]
    for record in records:
        if not isinstance(record, dict):
            raise CommandError("the control API answered something other than a list of run records")
        rows.append(
            [
                shown(record.get("started")),
                _duration(record.get("duration_s")),
                shown(record.get("status")),
                shown(record.get("outcome")),
                shown(record.get("method")),
                shown(record.get("path"), PATH_WIDTH),
                shown(record.get("id")),
            ]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    widths[-1] = 0  # the last column is not padded: no line ends in spaces
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, (_, right) in zip(row, widths, COLUMNS, strict=True)
        ]
        lines.append("  ".join(cells) + "\n")
    return "".join(lines)


def _output(args: argparse.Namespace, text: str) -> str:
    """What to print of the answer ``text``: the table, or the JSON as the server sent it."""
    if args.json or args.run_id is not None:
        return as_printed(args, text)
    try:
        records = json.loads(text)
    except ValueError:
        raise CommandError("the control API answered something other than JSON") from None
    if not isinstance(records, list):
        raise CommandError("the control API answered something other than a list of run records")
    return table(records)


def main(argv: Sequence[str]) -> int:
    """Run ``kapow history`` with ``argv`` (without the leading words)."""
    return run("kapow history", lambda: _request(_parse(argv)), _output)
