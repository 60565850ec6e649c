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
``kapow server --write-control-credentials DIR`` or ``kapow
control-credentials DIR``.  Such a directory also records the control API's
URL, so that it alone reaches the server (:func:`control_url`).

An init program runs ``kapow route add`` once per route, and an operator
waits for every ``kapow route list``, so these commands start lean: their
requests go through :mod:`kapow.commands.control_call`, on the standard
library only, imported only once the command line is parsed (a usage error
or ``--help`` needs neither :mod:`ssl` nor :mod:`socket`), and nothing here
imports :mod:`typing`, :mod:`shutil` or :mod:`urllib`.

Errors are one line on stderr, exit status 1: ``kapow: REASON`` for what
the control API answered or why it could not be reached, ``COMMAND:
MESSAGE`` for the rest (:class:`CommandError`), ending with ``(see COMMAND
--help)`` when the command line is wrong (:class:`UsageError`).
"""

from __future__ import annotations

import argparse
import os
import sys

from kapow.core.credentials import (
    CONTROL_ENVIRON,
    CONTROL_URL_ENV,
    DEFAULT_CONTROL_URL,
    CredentialsError,
    read_control_url,
)

# typing.TYPE_CHECKING without importing typing, which these commands need
# only for annotations; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from typing import NoReturn

    #: What a command asks of the control API: (its parsed arguments, the
    #: method, the path, the JSON body or None, the status that means success).
    ControlRequest = tuple[argparse.Namespace, str, str, object, int]


NO_CREDENTIALS = (
    "no control API credentials: give --control-credentials DIR or set KAPOW_CONTROL_CREDENTIALS=DIR, "
    "the directory that `kapow server --write-control-credentials DIR` or `kapow control-credentials DIR` "
    "wrote (init programs get KAPOW_CONTROL_* from the server)"
)


class CommandError(Exception):
    """A failure to report as one line on stderr, ``COMMAND: MESSAGE``, exit status 1.

    :param message: what went wrong.
    :param command: the command at fault (``kapow route add``); ``None`` for
        the command that runs.  ``str()`` is ``COMMAND: MESSAGE`` when given,
        else ``MESSAGE``.
    """

    #: Whether the line ends with ``(see COMMAND --help)``.
    usage = False

    def __init__(self, message: str, command: str | None = None) -> None:
        super().__init__(f"{command}: {message}" if command else message)
        self.message = message
        self.command = command

    def line(self, command: str) -> str:
        """The line that reports this error of ``command`` (of its own command, when it names one)."""
        command = self.command or command
        hint = f" (see {command} --help)" if self.usage else ""
        return f"{command}: {flat(self.message)}{hint}"


class UsageError(CommandError):
    """A command line that is wrong: its line ends with ``(see COMMAND --help)``."""

    usage = True


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line and status 1, like every other failure."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


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
    """The options of every command of the control API, as a parent parser."""
    common = Parser(add_help=False, formatter_class=Formatter)
    common.add_argument(
        "--control-url",
        help="control API URL [$KAPOW_CONTROL_URL, else the URL recorded in the credentials "
        f"directory, else {DEFAULT_CONTROL_URL}]",
    )
    common.add_argument(
        "--control-credentials",
        metavar="DIR",
        default=os.environ.get("KAPOW_CONTROL_CREDENTIALS"),
        help="directory with server.crt, client.crt, client.key and control_url "
        "[$KAPOW_CONTROL_CREDENTIALS; else the $KAPOW_CONTROL_* certificates]",
    )
    return common


def parse_action(
    parser: Parser,
    # argparse names the type of add_subparsers()'s result only privately
    sub: argparse._SubParsersAction[Parser],
    argv: Sequence[str],
) -> argparse.Namespace:
    """``argv`` of a command with actions (``kapow route list ...``), parsed.

    The action's own parser parses what follows the action, options before
    or after its arguments, so that its errors name it (``kapow route list:
    unrecognized arguments: x``); the command's parser reports a missing or
    unknown action, or shows the command's help.
    """
    action = argv[0] if argv else ""
    one = sub.choices.get(action)
    if one is None:
        return parser.parse_args(argv)
    return one.parse_intermixed_args(argv[1:], argparse.Namespace(action=action))


def action_command(command: str, argv: Sequence[str]) -> str:
    """``command ACTION`` (``kapow route list``), the command that
    :func:`run` names in a failure after :func:`parse_action` parsed ``argv``
    (the parsers' own errors name their command themselves)."""
    return f"{command} {argv[0]}" if argv else command


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
    """The pinned mutual TLS settings from ``directory`` or from ``environ``.

    :raises CommandError: naming what is missing or unusable; with no
        directory and none of the ``KAPOW_CONTROL_*`` certificates, both
        ways to give them.
    """
    from kapow.commands import control_call

    try:
        if directory:
            return control_call.context_from_directory(directory)
        if not any(environ.get(name) for name in CONTROL_ENVIRON):
            raise CommandError(NO_CREDENTIALS)
        return control_call.context_from_environ(environ)
    except CredentialsError as e:
        raise CommandError(str(e)) from None


def control_url(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    """The control API's URL: ``--control-url``, else ``$KAPOW_CONTROL_URL``,
    else the one the credentials directory records, else :data:`DEFAULT_CONTROL_URL`.

    :raises CommandError: if the directory's record cannot be read.
    """
    if args.control_url is not None:
        return str(args.control_url)
    if environ.get(CONTROL_URL_ENV):
        return environ[CONTROL_URL_ENV]
    try:
        recorded = read_control_url(args.control_credentials) if args.control_credentials else None
    except CredentialsError as e:
        raise CommandError(str(e)) from None
    return recorded or DEFAULT_CONTROL_URL


def as_printed(args: argparse.Namespace, text: str) -> str:
    """The answer ``text`` as it came, ending with a line break (nothing for no answer)."""
    if not text:
        return ""
    return text if text.endswith("\n") else text + "\n"


def run(
    command: str,
    request: Callable[[], ControlRequest],
    output: Callable[[argparse.Namespace, str], str] = as_printed,
) -> int:
    """Make the control API call ``request`` describes, print what ``output``
    makes of its answer, and return the exit status: 1 with one line on
    stderr for any failure.

    :param command: the command that runs (``kapow route list``), which the
        line of a :class:`CommandError` names.
    """
    try:
        args, method, path, body, expected = request()
    except CommandError as e:
        return _failed(e.line(command))
    from kapow.commands import control_call  # only now: parsing needs neither ssl nor socket

    try:
        tls = context(args.control_credentials, os.environ)
        text = control_call.call(tls, control_url(args, os.environ), method, path, body, expected)
        printed = output(args, text)
    except CommandError as e:
        return _failed(e.line(command))
    except control_call.ControlError as e:
        return _failed(f"kapow: {one_line(e)}")
    sys.stdout.write(printed)
    return 0


def _failed(line: str) -> int:
    sys.stderr.write(line + "\n")
    return 1


def one_line(exc: BaseException) -> str:
    """The text of ``exc`` on one line (its type's name when it has none)."""
    return flat(str(exc) or type(exc).__name__)


def flat(text: str) -> str:
    """``text`` on one line: each run of white space (line breaks too) one space."""
    return " ".join(text.split())
