"""
The ``kapow`` command.

``kapow get``, ``kapow set`` and ``kapow unset`` run several times inside every request, so
they are dispatched before anything else is imported: they load only
:mod:`kapow.commands.data_client`. Every other command imports what it needs when it
runs.
"""

import sys

USAGE = """\
usage: kapow [--version] [--help] COMMAND [ARGS]

Turn shell commands into HTTP APIs.

commands:
  server                 run the server and its init programs
  route                  add, list, get and remove routes (control API)
  handler                list, show and kill live handlers (control API)
  history                show the runs handlers left (control API)
  get                    read a request resource inside a handler
  set                    write a response resource inside a handler
  unset                  remove a response header or cookie inside a handler
  control-credentials    create a persistent set of control API certificates

Run `kapow COMMAND --help` for the options of each command.

example:
  kapow server --bind 127.0.0.1:8080 examples/hello.pow
"""


def main(argv: list[str] | None = None) -> int:
    """Run the ``kapow`` command with ``argv`` (``sys.argv`` by default)."""
    if argv is None:
        argv = sys.argv
    command = argv[1] if len(argv) > 1 else None
    if command in ("get", "set", "unset"):
        from kapow.commands.data_client import main as data_main

        return data_main(argv)
    if command == "server":
        from kapow.server.main import main as server_main

        return server_main(argv[2:])
    if command == "route":
        from kapow.commands.routes import main as route_main

        return route_main(argv[2:])
    if command == "handler":
        from kapow.commands.handlers import main as handler_main

        return handler_main(argv[2:])
    if command == "history":
        from kapow.commands.history import main as history_main

        return history_main(argv[2:])
    if command == "control-credentials":
        from kapow.commands.control_credentials import main as credentials_main

        return credentials_main(argv[2:])
    if command == "--version":
        from kapow import __version__

        sys.stdout.write(f"kapow {__version__}\n")
        return 0
    if command in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if command is None:
        sys.stderr.write(USAGE)
        return 1
    sys.stderr.write(f"kapow: unknown command {command!r} (see kapow --help)\n")
    return 1
