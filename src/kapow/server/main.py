"""
``kapow server``: the reference's command line for the twist plugin
(docs/reference/cli.rst), logging text lines to stdout.

Its help is printed from :mod:`kapow.server.help_text`, without importing
Twisted or the server.
"""

from __future__ import annotations

import sys

#: The arguments that ask for the help alone.
HELP_ARGS = (["--help"], ["-h"])


def main(args: list[str]) -> int:
    """
    Parse ``args`` as the ``kapow`` plugin's options and run the service the
    way ``twist kapow`` does, logging text lines to stdout.
    """
    if args in HELP_ARGS:
        from kapow.server.help_text import HELP

        sys.stdout.write(HELP)
        return 0

    from twisted.python.usage import UsageError

    from kapow.server.assembly import Options, makeService

    options = Options()
    try:
        options.parseOptions(args)
    except UsageError as e:
        sys.stderr.write(f"kapow server: {e} (see kapow server --help)\n")
        return 1

    from twisted.application.twist._options import TwistOptions
    from twisted.application.twist._twist import Twist
    from twisted.internet import reactor
    from twisted.logger import LogLevel

    from kapow.server.logs import text_log_observer

    service = makeService(options)
    Twist.startService(reactor, service)
    run = TwistOptions()  # what Twist.run reads of twist's own command line
    run.update(
        reactor=reactor,
        logLevel=LogLevel.info,
        logFile=sys.stdout,
        fileLogObserverFactory=text_log_observer,
    )
    Twist.run(run)
    return 0
