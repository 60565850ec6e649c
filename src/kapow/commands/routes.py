"""
``kapow route ...``: list, add, get and remove the routes of a running server.

See the command line reference (docs/reference/cli.rst) for the flags and the
control API reference (docs/reference/control-api.rst) for the calls they
make.  An init program runs ``kapow route add`` once per route, and an
operator waits for every ``kapow route list``, so this command starts lean:
it runs on the standard library only (:mod:`kapow.commands.control`), and
the many options of ``route add`` (with the modules that read their values)
are set up only for ``route add``.
"""

from __future__ import annotations

import argparse
import os
import sys

from kapow.commands.control import (
    CommandError,
    Formatter,
    Parser,
    UsageError,
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
    from collections.abc import Sequence

    from kapow.commands.control import ControlRequest

EPILOG_ADD = """\
examples:
  kapow route add /hello -c 'echo Hello | kapow set /response/body'
  kapow route add -X POST '/echo/{name}' - <<'EOF'
    kapow get /request/matches/name | kapow set /response/body
  EOF
  kapow route add --mode websocket --origin https://app.example /chat -c 'exec ./chat'
  kapow route add --mode events --heartbeat 10 /ticks -c 'exec ./ticks'
  kapow route add --rate 10/m --burst 20 --cors https://app.example --cors-header Content-Type \
    -X POST /api/search ./search.sh
"""


def _parser() -> tuple[Parser, argparse._SubParsersAction[Parser]]:
    """``kapow route``'s parser and its actions, those of ``add`` still without their options."""
    parser = Parser(
        prog="kapow route",
        description="Manage the routes of a running server over its control API (mutual TLS).",
        epilog="examples:\n  kapow route list\n  kapow route add /hello -c 'echo hi | kapow set /response/body'\n"
        "  kapow route remove 3f1c9a52-...\n\n"
        "From an operator shell, point KAPOW_CONTROL_CREDENTIALS at the directory written by\n"
        "`kapow server --write-control-credentials DIR`: it holds the certificates and the URL.",
        formatter_class=Formatter,
    )
    common = common_options()
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)

    sub.add_parser(
        "add",
        parents=[common],
        help="append (or insert) a route",
        epilog=EPILOG_ADD,
        formatter_class=Formatter,
    )
    add_list_and_by_id(
        sub,
        common,
        "route",
        "print the routes as JSON",
        "'.[] | \"\\(.index) \\(.method) \\(.url_pattern)\"'",
        (("get", "print one route as JSON"), ("remove", "remove a route")),
        "route_id",
    )
    return parser, sub


def _add_options(add: Parser) -> None:
    """The options and arguments of ``kapow route add``."""
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
    add.add_argument(
        "--rate",
        type=_rate,
        metavar="N/UNIT",
        help="at most N requests per UNIT (s, m, h, d, or a number of them: 10/s, 100/m, 1/30s) "
        "from each client; more get 429 with Retry-After",
    )
    add.add_argument(
        "--burst", type=int, metavar="B", help="with --rate: up to B requests at once [N of --rate]"
    )
    add.add_argument(
        "--rate-key",
        choices=("client", "route"),
        help="with --rate: a limit per client address (the default) or one for the whole route",
    )
    add.add_argument(
        "--cors",
        dest="cors_origins",
        action="append",
        metavar="ORIGIN",
        help="answer CORS preflights and allow cross-origin requests from ORIGIN "
        "(scheme://host[:port]; * for any), repeatable",
    )
    add.add_argument(
        "--cors-header",
        dest="cors_headers",
        action="append",
        metavar="NAME",
        help="with --cors: a request header cross-origin requests may send, repeatable",
    )
    add.add_argument(
        "--cors-max-age",
        type=int,
        metavar="S",
        help="with --cors: seconds a browser may keep a preflight's answer [600]",
    )
    add.add_argument(
        "--cors-credentials",
        action="store_const",
        const=True,
        help="with --cors (not *): allow cookies and credentials on cross-origin requests",
    )
    add.add_argument(
        "--mode",
        choices=("http", "websocket", "events"),
        help="serve a matching request as one response (http, the default), a WebSocket "
        "connection to the handler's stdin and stdout, or a Server-Sent Events stream of its stdout",
    )
    add.add_argument(
        "--origin",
        dest="origins",
        action="append",
        metavar="URL",
        help="with --mode websocket: also accept upgrades from this origin, * for any (repeatable)",
    )
    add.add_argument(
        "--messages",
        choices=("lines", "binary"),
        help="with --mode websocket: a message per line (the default) or the bytes as they come",
    )
    add.add_argument(
        "--max-message",
        type=_size,
        metavar="BYTES",
        help="with --mode websocket: the largest message (K, M, G suffixes) [1M]",
    )
    add.add_argument(
        "--ping", type=float, metavar="S", help="with --mode websocket: seconds between pings, 0 never [30]"
    )
    add.add_argument(
        "--heartbeat",
        type=float,
        metavar="S",
        help="with --mode events: seconds between keep-alive comments, 0 never [15]",
    )
    add.add_argument(
        "--job",
        action="store_const",
        const=True,
        help="answer 202 at once and keep the response as a job's result at /_jobs/ID/result",
    )
    add.add_argument("url_pattern", metavar="URL_PATTERN", help="e.g. /greet/{name}")
    add.add_argument(
        "command_file", metavar="COMMAND_FILE", nargs="?", help="file with the command, or - for stdin"
    )


def _size(text: str) -> int:
    """
    A number of bytes with an optional K, M or G suffix (powers of 1024, as
    ``--limit`` takes them): ``2K`` is 2048. Whether the number suits its
    field is the server's to say.
    """
    from kapow.core.resource_limits import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _rate(text: str) -> tuple[int, float]:
    """``--rate N/UNIT`` as (requests, seconds): ``1/30s`` is ``(1, 30.0)``."""
    from kapow.core.traffic import parse_rate

    try:
        return parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """
    Parse ``argv``; options may come before or after the arguments, as with
    the reference's command line.
    """
    parser, sub = _parser()
    if argv[:1] == ["add"]:
        _add_options(sub.choices["add"])
    return parse_action(parser, sub, argv)


def _command(args: argparse.Namespace) -> str:
    if args.command is not None and args.command_file is not None:
        raise UsageError("give the command with -c or in COMMAND_FILE, not both")
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
    ("mode", "mode"),
    ("origins", "origins"),
    ("messages", "messages"),
    ("max_message", "max_message"),
    ("ping", "ping"),
    ("heartbeat", "heartbeat"),
    ("job", "job"),
)


def _request(args: argparse.Namespace) -> ControlRequest:
    """(``args``, method, path, JSON body or None, expected status) for ``args``."""
    if args.action == "add":
        body: dict[str, object] = {
            "method": args.method,
            "url_pattern": args.url_pattern,
            "entrypoint": args.entrypoint,
            "command": _command(args),
        }
        for name, field in _OPTIONAL_FIELDS:
            if getattr(args, name) is not None:
                body[field] = getattr(args, name)
        if args.limit:
            from kapow.core.resource_limits import InvalidLimit, parse_limits

            try:
                body["limits"] = parse_limits(args.limit)
            except InvalidLimit as e:
                raise UsageError(str(e)) from None
        auth = _auth(args)
        if auth:
            body["auth"] = auth
        _traffic(args, body)
        if args.index is None:
            return args, "POST", "/routes", body, 201
        body["index"] = args.index
        return args, "PUT", "/routes", body, 201
    if args.action == "list":
        return args, "GET", "/routes", None, 200
    path = "/routes/" + quote(args.route_id)
    if args.action == "get":
        return args, "GET", path, None, 200
    return args, "DELETE", path, None, 204


def _auth(args: argparse.Namespace) -> dict[str, object]:
    """The route's ``auth`` from the ``--auth-*`` and ``--allow`` flags; file names made absolute,
    since the server reads them from its own working directory."""
    auth: dict[str, object] = {}
    if args.auth_bearer is not None:
        auth["bearer_tokens_file"] = _absolute(args.auth_bearer, "--auth-bearer")
    if args.auth_basic is not None:
        auth["basic_users_file"] = _absolute(args.auth_basic, "--auth-basic")
    if args.auth_hmac is not None:
        parts = args.auth_hmac.split(":", 3)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise UsageError(f"--auth-hmac {args.auth_hmac!r}: expected HEADER:FILE[:ALGORITHM[:PREFIX]]")
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
                raise UsageError(f"--allow {network!r}: {e}") from None
        auth["allow"] = [network.strip() for network in args.allow]
    return auth


def _traffic(args: argparse.Namespace, body: dict[str, object]) -> None:
    """The route's ``rate`` and ``cors`` from their flags, put in ``body`` when given."""
    if args.rate is not None:
        requests, per = args.rate
        rate: dict[str, object] = {"requests": requests, "per": int(per) if per.is_integer() else per}
        if args.burst is not None:
            rate["burst"] = args.burst
        if args.rate_key is not None:
            rate["key"] = args.rate_key
        body["rate"] = rate
    else:
        for flag, value in (("--burst", args.burst), ("--rate-key", args.rate_key)):
            if value is not None:
                raise UsageError(f"{flag} needs --rate")
    if args.cors_origins:
        cors: dict[str, object] = {"origins": args.cors_origins}
        if args.cors_headers:
            cors["headers"] = args.cors_headers
        if args.cors_max_age is not None:
            cors["max_age"] = args.cors_max_age
        if args.cors_credentials:
            cors["credentials"] = True
        body["cors"] = cors
    else:
        given = (
            ("--cors-header", args.cors_headers),
            ("--cors-max-age", args.cors_max_age),
            ("--cors-credentials", args.cors_credentials),
        )
        for flag, value in given:
            if value is not None:
                raise UsageError(f"{flag} needs --cors")


def _absolute(path: str, flag: str) -> str:
    if not path:
        raise UsageError(f"{flag}: the file name is empty")
    return os.path.abspath(path)


def main(argv: Sequence[str]) -> int:
    """Run ``kapow route`` with ``argv`` (without the leading words)."""
    return run(action_command("kapow route", argv), lambda: _request(_parse(argv)))
