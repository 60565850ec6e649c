"""
What the command lines of the control API share: their parser, their common
options, and one call run to one exit status.

``kapow route`` (:mod:`kapow.commands.routes`) and ``kapow handler``
(:mod:`kapow.commands.handlers`) are clients of the control API (see the
control API reference, docs/reference/control-api.rst, and the command line
reference, docs/reference/cli.rst).  Requests go over pinned mutual TLS: the
client trusts exactly the control server certificate and presents the
control client certificate, both taken from ``KAPOW_CONTROL_*`` variables
(set for init programs) or from a credentials directory
(``--control-credentials DIR`` or ``$KAPOW_CONTROL_CREDENTIALS``) written by
``kapow server --write-control-credentials DIR``.

An init program runs ``kapow route add`` once per route, so this command's
start-up delays the server's readiness: its requests go through
:mod:`kapow.commands.control_call`, on the standard library only, and nothing
here imports :mod:`typing`, :mod:`shutil` or :mod:`urllib`.
"""

from __future__ import annotations

import argparse
import os
import sys

from kapow.commands import control_call
from kapow.core.credentials import CredentialsError

# typing.TYPE_CHECKING without importing typing, which these commands need
# only for annotations; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterable, Mapping
    from typing import NoReturn

    #: What a command asks of the control API: (its parsed arguments, the
    #: method, the path, the JSON body or None, the status that means success).
    ControlRequest = tuple[argparse.Namespace, str, str, object, int]


class CommandError(Exception):
    """A failure to report as one line on stderr, exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line and status 1, like every other failure."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{self.prog}: {message}")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, sized to the terminal without :mod:`shutil`.

    argparse makes a formatter for every argument added, to check it, and its
    own one imports :mod:`shutil` (which brings :mod:`bz2`, :mod:`lzma` and
    :mod:`fnmatch` along) only to learn the terminal width:
    :func:`_terminal_columns` finds the same width.
    """

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        if width is None:
            width = _terminal_columns() - 2  # as argparse.HelpFormatter does
        super().__init__(prog, indent_increment, max_help_position, width)


def _terminal_columns() -> int:
    """The width :func:`shutil.get_terminal_size` gives: ``$COLUMNS``, the terminal's, or 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    if stdout is None:
        return 80
    try:
        return os.get_terminal_size(stdout.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def common_options() -> Parser:
    """The options of every ``kapow route`` and ``kapow handler`` command, as a parent parser."""
    common = Parser(add_help=False, formatter_class=Formatter)
    common.add_argument(
        "--control-url",
        default=os.environ.get("KAPOW_CONTROL_URL", "https://localhost:8081"),
        help="control API URL [$KAPOW_CONTROL_URL, else https://localhost:8081]",
    )
    common.add_argument(
        "--control-credentials",
        metavar="DIR",
        default=os.environ.get("KAPOW_CONTROL_CREDENTIALS"),
        help="directory with server.crt, client.crt, client.key "
        "[$KAPOW_CONTROL_CREDENTIALS; else the $KAPOW_CONTROL_* certificates]",
    )
    return common


def add_list_and_by_id(
    # argparse names the type of add_subparsers()'s result only privately
    sub: argparse._SubParsersAction[Parser],
    common: Parser,
    command: str,
    list_help: str,
    jq: str,
    by_id: Iterable[tuple[str, str]],
    dest: str,
) -> None:
    """The ``list`` action of ``kapow COMMAND`` and its actions on one item by id.

    :param by_id: (action, help) of each action on one item, whose id goes to ``dest``.
    """
    sub.add_parser(
        "list",
        parents=[common],
        help=list_help,
        epilog=f"example:\n  kapow {command} list | jq -r {jq}",
        formatter_class=Formatter,
    )
    for name, what in by_id:
        one = sub.add_parser(
            name,
            parents=[common],
            help=what,
            description=what[0].upper() + what[1:] + ", by its id.",
            epilog=f"example:\n  kapow {command} {name} $(kapow {command} list | jq -r '.[0].id')",
            formatter_class=Formatter,
        )
        one.add_argument(dest, metavar="ID")


# What urllib.parse.quote(segment, safe="") leaves as it is (RFC 3986 unreserved).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


def quote(segment: str) -> str:
    """``segment`` percent-encoded as one path segment, as ``urllib.parse.quote(segment, safe="")``.

    Written out: importing :mod:`urllib.parse` would add a few milliseconds
    to every ``kapow route get`` and ``kapow route remove``.
    """
    return "".join(chr(byte) if byte in _UNRESERVED else f"%{byte:02X}" for byte in segment.encode("utf-8"))


def context(directory: str | None, environ: Mapping[str, str]) -> ssl.SSLContext:
    """The pinned mutual TLS settings from ``directory`` or from ``environ``."""
    try:
        if directory:
            return control_call.context_from_directory(directory)
        return control_call.context_from_environ(environ)
    except CredentialsError as e:
        raise CommandError(str(e)) from None


def run(request: Callable[[], ControlRequest]) -> int:
    """Make the control API call ``request`` describes, print its answer, and
    return the exit status: 1 with one line on stderr for any failure."""
    try:
        args, method, path, body, expected = request()
        text = control_call.call(
            context(args.control_credentials, os.environ), args.control_url, method, path, body, expected
        )
    except (CommandError, control_call.ControlError) as e:
        sys.stderr.write(f"kapow: {one_line(e)}\n")
        return 1
    if text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def one_line(exc: BaseException) -> str:
    """The text of ``exc`` on one line (its type's name when it has none)."""
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
