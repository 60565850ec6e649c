"""
``kapow handler ...``: see and end the live handlers of a running server.

See the command line reference (docs/reference/cli.rst) and the control API
reference (docs/reference/control-api.rst) for the calls it makes.  Like
``kapow route``, it runs on the standard library only
(:mod:`kapow.commands.control`).
"""

from __future__ import annotations

from kapow.commands.control import (
    Formatter,
    Parser,
    action_command,
    add_list_and_by_id,
    common_options,
    parse_action,
    quote,
    run,
)

# typing.TYPE_CHECKING without importing typing, which this command needs
# only for annotations; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from kapow.commands.control import ControlRequest


def _parser() -> tuple[Parser, argparse._SubParsersAction[Parser]]:
    """``kapow handler``'s parser and its actions."""
    parser = Parser(
        prog="kapow handler",
        description="See and end the live handlers of a running server over its control API (mutual TLS).",
        epilog="examples:\n  kapow handler list\n  kapow handler kill $(kapow handler list | jq -r '.[0].id')",
        formatter_class=Formatter,
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)
    add_list_and_by_id(
        sub,
        common_options(),
        "handler",
        "print the live handlers as JSON",
        "'.[] | \"\\(.id) \\(.state) \\(.pid) \\(.path)\"'",
        (
            ("get", "print one handler as JSON"),
            ("kill", "end a handler: its whole process group gets SIGTERM (SIGKILL after the grace period)"),
        ),
        "handler_id",
    )
    return parser, sub


def main(argv: Sequence[str]) -> int:
    """Run ``kapow handler`` with ``argv`` (without the leading words)."""

    def request() -> ControlRequest:
        args = parse_action(*_parser(), argv)
        if args.action == "list":
            return args, "GET", "/handlers", None, 200
        path = "/handlers/" + quote(args.handler_id)
        return (args, "GET", path, None, 200) if args.action == "get" else (args, "DELETE", path, None, 204)

    return run(action_command("kapow handler", argv), request)
