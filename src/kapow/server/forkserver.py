"""
Starting the pre-started ``kapow route`` (:mod:`kapow.commands.forkserver`)
that the native client hands ``kapow route ...`` to, so that init programs
adding many routes do not start Python for each (docs/reference/cli.rst,
``kapow route``).
"""

from __future__ import annotations

import os
import socket
import sys

from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

import kapow

__all__ = ["start_forkserver"]

log = Logger()

#: The forkserver's descriptor of its listening socket.
_FORKSERVER_FD = 3


def start_forkserver(reactor: IReactorProcess, socket_path: str) -> IProcessTransport:
    """
    Listen on the Unix socket ``socket_path`` and start :mod:`kapow.commands.forkserver`
    on it; return its process transport (closing its standard input ends it).
    The socket listens before this returns, so a client that connects while
    the process still starts waits in the backlog instead of falling back.
    """
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listening.bind(socket_path)
        listening.listen(128)
        package_dir = os.path.dirname(os.path.abspath(kapow.__file__))
        # run by its file, with the package's parent on its path: ``-I -S``
        # skips the site processing that would find an editable install
        script = os.path.join(package_dir, "commands", "forkserver.py")
        return reactor.spawnProcess(
            _ForkserverProtocol(),
            sys.executable,
            [sys.executable, "-I", "-S", script, os.path.dirname(package_dir), str(_FORKSERVER_FD)],
            env=dict(os.environ),
            childFDs={0: "w", 1: 1, 2: 2, _FORKSERVER_FD: listening.fileno()},
        )
    finally:
        listening.close()


class _ForkserverProtocol(ProcessProtocol):
    def processEnded(self, reason: Failure) -> None:
        if not reason.check(ProcessDone):
            log.warn("the kapow route forkserver ended: {reason}", reason=reason.getErrorMessage())
