"""
The server's private launcher directory: the ``kapow`` that handlers and
init programs run, first on their ``PATH`` (docs/reference/cli.rst,
``--data-client``), and what servers that were killed left of theirs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping

from twisted.application.service import Service
from twisted.internet.interfaces import IProcessTransport
from twisted.logger import Logger

from kapow.commands.launcher import FORKSERVER_SOCKET, write_launcher
from kapow.server.systemd import child_environ

__all__ = ["LAUNCHER_OWNER", "LAUNCHER_PREFIX", "LauncherDirectory", "remove_stale_launcher_dirs"]

log = Logger()

#: The launcher directories' names begin with this, in the temporary directory.
LAUNCHER_PREFIX = "kapow-bin-"
#: The file in a launcher directory that holds the pid of the server it is for.
LAUNCHER_OWNER = "server.pid"


def remove_stale_launcher_dirs(parent: str) -> list[str]:
    """
    Remove the launcher directories in ``parent`` that this user's servers
    left behind when they were killed (a server removes its own when it
    stops): those whose server's pid no longer runs. A directory without
    its pid (being made) or of a process still running is kept.

    :return: the directories removed.
    """
    removed = []
    uid = os.getuid()
    for name in os.listdir(parent):
        if not name.startswith(LAUNCHER_PREFIX):
            continue
        path = os.path.join(parent, name)
        try:
            if os.lstat(path).st_uid != uid:
                continue
            with open(os.path.join(path, LAUNCHER_OWNER)) as f:
                pid = int(f.read())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except (OSError, ValueError):
            continue
    return removed


class LauncherDirectory(Service):
    """
    A private directory holding the ``kapow`` that handlers and init programs
    run, first on their PATH so ``kapow get``/``kapow set`` start fast: the
    native client, or the lean Python launcher; removed when the service
    stops, or by the next server to start if this one was killed.

    With the native client and a ``forkserver``, it also runs the pre-started
    ``kapow route`` of :mod:`kapow.commands.forkserver`, listening on
    ``kapow-cli.sock`` in the directory, which the native client uses for
    ``kapow route ...``; it ends when the service stops or the server dies.

    :param native: the path of the native client, or ``None`` for the Python one.
    :param forkserver: starts the forkserver on the socket path it is given
        (:func:`kapow.server.forkserver.start_forkserver`), or ``None`` for none.
    """

    name = "launcher"
    path: str | None = None
    forkserver: IProcessTransport | None = None

    def __init__(
        self, native: str | None, forkserver: Callable[[str], IProcessTransport] | None = None
    ) -> None:
        self.native = native
        self.start_forkserver = forkserver

    def startService(self) -> None:
        super().startService()
        remove_stale_launcher_dirs(tempfile.gettempdir())
        self.path = tempfile.mkdtemp(prefix=LAUNCHER_PREFIX)
        with open(os.path.join(self.path, LAUNCHER_OWNER), "w") as f:
            f.write(str(os.getpid()))
        write_launcher(self.path, native=self.native)
        if self.native is None:
            log.info("handlers get the python data client")
            return
        log.info("handlers get the native data client ({path})", path=self.native)
        if self.start_forkserver is not None:
            self.forkserver = self.start_forkserver(os.path.join(self.path, FORKSERVER_SOCKET))

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` with the launcher directory first on ``PATH``."""
        env = child_environ(base)
        env["PATH"] = os.pathsep.join(filter(None, (self.path, base.get("PATH", os.defpath))))
        return env

    def stopService(self) -> None:
        super().stopService()
        if self.forkserver is not None:
            self.forkserver.closeStdin()  # its end: see kapow.commands.forkserver
            self.forkserver = None
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
