"""
``kapow control-credentials DIR``: write a persistent set of control API
certificates and keys.

See "Control API credentials" in the command line reference
(docs/reference/cli.rst) and the control API how-to
(docs/howto/control-api.rst).  :mod:`cryptography` is imported only when the
command runs.
"""

from __future__ import annotations

import sys

from kapow.commands.control import CommandError, Formatter, Parser, one_line

# typing.TYPE_CHECKING without importing typing; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    """``kapow control-credentials DIR``: write a full persistent set."""
    parser = Parser(
        prog="kapow control-credentials",
        description="Create control API certificates and keys (server.crt, server.key, "
        "client.crt, client.key) for `kapow server --control-credentials DIR`, so that "
        "restarts keep them.",
        epilog="example:\n  kapow control-credentials /etc/kapow/control "
        "--control-reachable-addr localhost:8081",
        formatter_class=Formatter,
    )
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument(
        "--control-reachable-addr",
        default="localhost:8081",
        metavar="HOST:PORT",
        help="where clients reach the control API; its host goes into the server "
        "certificate [default: localhost:8081]",
    )
    from kapow.core import credentials

    try:
        args = parser.parse_args(argv)
        creds = credentials.generate_control_credentials(args.control_reachable_addr)
        credentials.write_full_credentials(creds, args.directory)
    except (CommandError, ValueError, OSError, credentials.CredentialsError) as e:
        sys.stderr.write(f"kapow: {one_line(e)}\n")
        return 1
    return 0
