"""
``kapow route ...``, ``kapow handler ...`` and ``kapow control-credentials``:
the control API client.

Requests go over pinned mutual TLS: the client trusts exactly the control
server certificate and presents the control client certificate, both taken
from ``KAPOW_CONTROL_*`` variables (set for init programs) or from a
credentials directory (``--control-credentials DIR`` or
``$KAPOW_CONTROL_CREDENTIALS``) written by ``kapow server
--write-control-credentials DIR``.

An init program runs ``kapow route add`` once per route, so this command's
start-up delays the server's readiness: its requests go through
:mod:`kapow.commands.control_call`, on the standard library only.
"""

from __future__ import annotations

import argparse
import os
import sys

from kapow.commands import control_call as control_https
from kapow.core.credentials import CredentialsError
from kapow.core.resource_limits import InvalidLimit, parse_limits

# typing.TYPE_CHECKING without importing typing, which this command needs
# only for annotations; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

EPILOG_ADD = """\
examples:
  kapow route add /hello -c 'echo Hello | kapow set /response/body'
  kapow route add -X POST '/echo/{name}' - <<'EOF'
    kapow get /request/matches/name | kapow set /response/body
  EOF
"""


class CommandError(Exception):
    """A failure to report as one line on stderr, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # usage errors are one line and status 1, like every other failure
        raise CommandError(f"{self.prog}: {message}")


class _Formatter(argparse.RawDescriptionHelpFormatter):
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
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def _common() -> argparse.ArgumentParser:
    """The options of every ``kapow route`` and ``kapow handler`` command."""
    common = argparse.ArgumentParser(add_help=False, formatter_class=_Formatter)
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


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = _Parser(
        prog="kapow route",
        description="Manage the routes of a running server over its control API (mutual TLS).",
        epilog="examples:\n  kapow route list\n  kapow route add /hello -c 'echo hi | kapow set /response/body'\n"
        "  kapow route remove 3f1c9a52-...\n\n"
        "From an operator shell, point KAPOW_CONTROL_CREDENTIALS at the directory written by\n"
        "`kapow server --write-control-credentials DIR`.",
        formatter_class=_Formatter,
    )
    common = _common()
    sub = parser.add_subparsers(dest="action", required=True, parser_class=_Parser)

    add = sub.add_parser(
        "add",
        parents=[common],
        help="append (or insert) a route",
        epilog=EPILOG_ADD,
        formatter_class=_Formatter,
    )
    add.add_argument("-X", "--method", default="GET", help="HTTP method [GET]")
    add.add_argument("-e", "--entrypoint", default="/bin/sh -c", help="program to run [/bin/sh -c]")
    add.add_argument("-c", "--command", help="command given to the entrypoint")
    add.add_argument("--index", type=int, help="insert at this position instead of appending")
    add.add_argument("--timeout", type=float, help="kill the handler after this many seconds")
    add.add_argument("--max-concurrency", type=int, help="at most this many handlers at once")
    add.add_argument(
        "--queue",
        type=int,
        metavar="N",
        help="with --max-concurrency: up to N requests wait instead of a 503",
    )
    add.add_argument(
        "--queue-timeout", type=float, metavar="S", help="seconds a request may wait in the queue [30]"
    )
    add.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a resource limit of the handler (memory, cpu, open_files, file_size, processes; "
        "sizes take K, M, G), repeatable: --limit memory=256M --limit cpu=10",
    )
    on_disconnect = add.add_mutually_exclusive_group()
    on_disconnect.add_argument(
        "--keep-running-on-disconnect",
        dest="keep_running",
        action="store_const",
        const=True,
        help="let handlers finish when their client hangs up",
    )
    on_disconnect.add_argument(
        "--kill-on-disconnect",
        dest="keep_running",
        action="store_const",
        const=False,
        help="end handlers when their client hangs up",
    )
    add.add_argument("--stdin", choices=("body",), help="give the handler the request body as its stdin")
    add.add_argument(
        "--buffer",
        action="store_const",
        const=True,
        help="hold the response until the handler exits, then send it with Content-Length",
    )
    add.add_argument(
        "--error-status",
        type=int,
        metavar="CODE",
        help="status (400-599) of a handler that exits non-zero before its response started",
    )
    add.add_argument(
        "--auth-bearer",
        metavar="FILE",
        help="require Authorization: Bearer with one of the tokens in FILE (one per line)",
    )
    add.add_argument(
        "--auth-basic",
        metavar="FILE",
        help="require Basic credentials of a user of the htpasswd FILE (bcrypt lines only)",
    )
    add.add_argument(
        "--auth-hmac",
        metavar="HEADER:FILE[:ALGORITHM[:PREFIX]]",
        help="require HEADER to be PREFIX + the hex HMAC (sha256 by default) of the body, "
        "keyed with the secret in FILE",
    )
    add.add_argument(
        "--allow",
        metavar="CIDR",
        action="append",
        help="accept only clients in this network (repeatable)",
    )
    add.add_argument("url_pattern", metavar="URL_PATTERN", help="e.g. /greet/{name}")
    add.add_argument(
        "command_file", metavar="COMMAND_FILE", nargs="?", help="file with the command, or - for stdin"
    )

    _list_and_by_id(
        sub,
        common,
        "route",
        "print the routes as JSON",
        "'.[] | \"\\(.index) \\(.method) \\(.url_pattern)\"'",
        (("get", "print one route as JSON"), ("remove", "remove a route")),
        "route_id",
    )
    return parser, add


def _list_and_by_id(
    sub: Any, common: argparse.ArgumentParser, command: str, list_help: str, jq: str, by_id: Any, dest: str
) -> None:
    """The ``list`` action of ``kapow COMMAND`` and its actions on one item by id."""
    sub.add_parser(
        "list",
        parents=[common],
        help=list_help,
        epilog=f"example:\n  kapow {command} list | jq -r {jq}",
        formatter_class=_Formatter,
    )
    for name, what in by_id:
        one = sub.add_parser(
            name,
            parents=[common],
            help=what,
            description=what[0].upper() + what[1:] + ", by its id.",
            epilog=f"example:\n  kapow {command} {name} $(kapow {command} list | jq -r '.[0].id')",
            formatter_class=_Formatter,
        )
        one.add_argument(dest, metavar="ID")


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """
    Parse ``argv``; options of ``route add`` may come before or after the
    URL pattern, as with the reference's command line.
    """
    parser, add = _parser()
    if argv[:1] == ["add"]:
        return add.parse_intermixed_args(argv[1:], argparse.Namespace(action="add"))
    return parser.parse_args(argv)


def _command(args: argparse.Namespace) -> str:
    if args.command is not None and args.command_file is not None:
        raise CommandError("give the command with -c or in COMMAND_FILE, not both")
    if args.command_file == "-":
        return sys.stdin.read()
    if args.command_file is not None:
        try:
            with open(args.command_file, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise CommandError(f"cannot read {args.command_file}: {e.strerror}") from None
    return args.command or ""


#: (flag's attribute, route field) of the optional fields, sent only when given
_OPTIONAL_FIELDS = (
    ("timeout", "timeout"),
    ("max_concurrency", "max_concurrency"),
    ("keep_running", "keep_running_on_disconnect"),
    ("stdin", "stdin"),
    ("buffer", "buffer"),
    ("error_status", "error_status"),
    ("queue", "queue"),
    ("queue_timeout", "queue_timeout"),
)


def _request(args: argparse.Namespace) -> tuple[argparse.Namespace, str, str, dict[str, Any] | None, int]:
    """(``args``, method, path, JSON body or None, expected status) for ``args``."""
    if args.action == "add":
        body: dict[str, Any] = {
            "method": args.method,
            "url_pattern": args.url_pattern,
            "entrypoint": args.entrypoint,
            "command": _command(args),
        }
        for name, field in _OPTIONAL_FIELDS:
            if getattr(args, name) is not None:
                body[field] = getattr(args, name)
        if args.limit:
            try:
                body["limits"] = parse_limits(args.limit)
            except InvalidLimit as e:
                raise CommandError(str(e)) from None
        auth = _auth(args)
        if auth:
            body["auth"] = auth
        if args.index is None:
            return args, "POST", "/routes", body, 201
        body["index"] = args.index
        return args, "PUT", "/routes", body, 201
    if args.action == "list":
        return args, "GET", "/routes", None, 200
    path = "/routes/" + _quote(args.route_id)
    if args.action == "get":
        return args, "GET", path, None, 200
    return args, "DELETE", path, None, 204


def _auth(args: argparse.Namespace) -> dict[str, Any]:
    """The route's ``auth`` from the ``--auth-*`` and ``--allow`` flags; file names made absolute,
    since the server reads them from its own working directory."""
    auth: dict[str, Any] = {}
    if args.auth_bearer is not None:
        auth["bearer_tokens_file"] = _absolute(args.auth_bearer, "--auth-bearer")
    if args.auth_basic is not None:
        auth["basic_users_file"] = _absolute(args.auth_basic, "--auth-basic")
    if args.auth_hmac is not None:
        parts = args.auth_hmac.split(":", 3)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise CommandError(f"--auth-hmac {args.auth_hmac!r}: expected HEADER:FILE[:ALGORITHM[:PREFIX]]")
        rule = {"header": parts[0], "secret_file": _absolute(parts[1], "--auth-hmac")}
        if len(parts) > 2 and parts[2]:
            rule["algorithm"] = parts[2]
        if len(parts) > 3:
            rule["prefix"] = parts[3]
        auth["hmac"] = rule
    if args.allow:
        import ipaddress  # only here: most routes have no --allow

        for network in args.allow:
            try:
                ipaddress.ip_network(network.strip(), strict=False)
            except ValueError as e:
                raise CommandError(f"--allow {network!r}: {e}") from None
        auth["allow"] = [network.strip() for network in args.allow]
    return auth


def _absolute(path: str, flag: str) -> str:
    if not path:
        raise CommandError(f"{flag}: the file name is empty")
    return os.path.abspath(path)


# What urllib.parse.quote(segment, safe="") leaves as it is (RFC 3986 unreserved).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


def _quote(segment: str) -> str:
    """``segment`` percent-encoded as one path segment, as ``urllib.parse.quote(segment, safe="")``.

    Written out: importing :mod:`urllib.parse` would add a few milliseconds
    to every ``kapow route get`` and ``kapow route remove``.
    """
    return "".join(chr(byte) if byte in _UNRESERVED else f"%{byte:02X}" for byte in segment.encode("utf-8"))


def context(directory: str | None, environ: Mapping[str, str]) -> ssl.SSLContext:
    """The pinned mutual TLS settings from ``directory`` or from ``environ``."""
    try:
        if directory:
            return control_https.context_from_directory(directory)
        return control_https.context_from_environ(environ)
    except CredentialsError as e:
        raise CommandError(str(e)) from None


def main(argv: Sequence[str]) -> int:
    """Run ``kapow route`` with ``argv`` (without the leading words)."""
    return _run(lambda: _request(_parse(argv)))


def _run(request: Callable[[], tuple[argparse.Namespace, str, str, dict[str, Any] | None, int]]) -> int:
    """Make the control API call ``request`` describes, print its answer, and
    return the exit status: 1 with one line on stderr for any failure."""
    try:
        args, method, path, body, expected = request()
        text = control_https.call(
            context(args.control_credentials, os.environ), args.control_url, method, path, body, expected
        )
    except (CommandError, control_https.ControlError) as e:
        sys.stderr.write(f"kapow: {_one_line(e)}\n")
        return 1
    if text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _handler_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kapow handler",
        description="See and end the live handlers of a running server over its control API (mutual TLS).",
        epilog="examples:\n  kapow handler list\n  kapow handler kill $(kapow handler list | jq -r '.[0].id')",
        formatter_class=_Formatter,
    )
    common = _common()
    sub = parser.add_subparsers(dest="action", required=True, parser_class=_Parser)
    _list_and_by_id(
        sub,
        common,
        "handler",
        "print the live handlers as JSON",
        "'.[] | \"\\(.id) \\(.state) \\(.pid) \\(.path)\"'",
        (
            ("get", "print one handler as JSON"),
            ("kill", "end a handler: its whole process group gets SIGTERM (SIGKILL after the grace period)"),
        ),
        "handler_id",
    )
    return parser


def handler_main(argv: Sequence[str]) -> int:
    """Run ``kapow handler`` with ``argv`` (without the leading words)."""

    def request() -> tuple[argparse.Namespace, str, str, None, int]:
        args = _handler_parser().parse_args(argv)
        if args.action == "list":
            return args, "GET", "/handlers", None, 200
        path = "/handlers/" + _quote(args.handler_id)
        return (args, "GET", path, None, 200) if args.action == "get" else (args, "DELETE", path, None, 204)

    return _run(request)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def credentials_main(argv: Sequence[str]) -> int:
    """``kapow control-credentials DIR``: write a full persistent set."""
    parser = _Parser(
        prog="kapow control-credentials",
        description="Create control API certificates and keys (server.crt, server.key, "
        "client.crt, client.key) for `kapow server --control-credentials DIR`, so that "
        "restarts keep them.",
        epilog="example:\n  kapow control-credentials /etc/kapow/control "
        "--control-reachable-addr localhost:8081",
        formatter_class=_Formatter,
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
        sys.stderr.write(f"kapow: {_one_line(e)}\n")
        return 1
    return 0
