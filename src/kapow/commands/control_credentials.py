"""
``kapow control-credentials DIR``: write a persistent set of control API
certificates and keys, with the URL they were made for.

See "Control API credentials" in the command line reference
(docs/reference/cli.rst) and the control API how-to
(docs/howto/control-api.rst).  :mod:`cryptography` is imported only when the
command runs.
"""

from __future__ import annotations

import sys

from kapow.commands.control import CommandError, Formatter, Parser, UsageError
from kapow.core.credentials import CREDENTIALS_FILES

# typing.TYPE_CHECKING without importing typing; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

COMMAND = "kapow control-credentials"


def _parser() -> Parser:
    parser = Parser(
        prog=COMMAND,
        description="Create control API certificates and keys (server.crt, server.key, "
        "client.crt, client.key) for `kapow server --control-credentials DIR`, so that "
        "restarts keep them, and record the control API's URL (control_url, "
        "https://HOST:PORT of --control-reachable-addr), so that "
        "KAPOW_CONTROL_CREDENTIALS=DIR alone reaches the server.",
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
    parser.add_argument("--force", action="store_true", help="replace the credentials DIR holds")
    return parser


def main(argv: Sequence[str]) -> int:
    """``kapow control-credentials DIR``: write a full persistent set and say what was written."""
    try:
        args = _parser().parse_args(argv)
        url = _write(args.directory, args.control_reachable_addr, args.force)
    except CommandError as e:
        sys.stderr.write(e.line(COMMAND) + "\n")
        return 1
    sys.stdout.write(f"wrote {', '.join(CREDENTIALS_FILES)} ({url}) in {args.directory}\n")
    return 0


def _write(directory: str, reachable_addr: str, force: bool) -> str:
    """Write a fresh set for ``reachable_addr`` into ``directory``, replacing one only if ``force``.

    :returns: the control URL it records, ``https://`` + ``reachable_addr``.
    :raises CommandError: saying why nothing, or not everything, was written.
    """
    from kapow.core import credentials

    existing = credentials.existing_credentials(directory)
    if existing and not force:
        raise CommandError(
            f"{directory} already holds control credentials ({', '.join(existing)}); give --force to replace them"
        )
    try:
        creds = credentials.generate_control_credentials(reachable_addr)
    except ValueError as e:
        raise UsageError(str(e)) from None
    url = f"https://{reachable_addr}"
    try:
        credentials.write_full_credentials(creds, directory, url)
    except (OSError, credentials.CredentialsError) as e:
        raise CommandError(str(e)) from None
    return url
