"""
Running under systemd (docs/howto/systemd.rst): readiness, stop and
watchdog notifications.

:func:`notify` is the ``sd_notify`` protocol (one datagram to
``$NOTIFY_SOCKET``); :func:`watchdog_interval` reads the watchdog settings
systemd passes in the environment; :func:`watchdog_service` pings the
watchdog from the reactor; :func:`child_environ` keeps the variables meant
for the server out of the processes it starts.

Socket activation needs nothing here: listener flags take Twisted's
``systemd:domain=INET:name=NAME`` endpoint description, which adopts the
socket systemd passed under ``FileDescriptorName=NAME``.

Only the standard library is imported at module level, so the notification
helpers cost nothing to import.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.application.internet import TimerService
    from twisted.internet.interfaces import IReactorTime

__all__ = [
    "SERVICE_VARIABLES",
    "child_environ",
    "notify",
    "watchdog_interval",
    "watchdog_service",
]

#: Variables systemd sets for the service's main process alone.
SERVICE_VARIABLES = frozenset(
    {
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
    }
)


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Tell the service manager about a change of state.

    ``state`` is sent as one datagram to the ``AF_UNIX`` socket named by
    ``NOTIFY_SOCKET``: a path, or a name in Linux's abstract namespace when it
    starts with ``@``. The call never blocks and never raises.

    :param state: newline-separated assignments, e.g. ``"READY=1"``,
        ``"STOPPING=1"``, ``"WATCHDOG=1"`` or ``"STATUS=draining"``.
    :param environ: where to look up ``NOTIFY_SOCKET``; ``os.environ`` by default.
    :return: ``True`` if the datagram was sent; ``False`` if ``NOTIFY_SOCKET``
        is unset, empty or not a socket address, or the send failed (no such
        socket, nobody listening, its queue full).
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """
    How often to send ``WATCHDOG=1``, if systemd watches this process.

    :param environ: where to look up ``WATCHDOG_USEC`` and ``WATCHDOG_PID``;
        ``os.environ`` by default.
    :return: half of ``WATCHDOG_USEC``, in seconds; ``None`` when it is unset,
        not a positive integer, or ``WATCHDOG_PID`` is set to another process
        than this one.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        if "WATCHDOG_PID" in env and int(env["WATCHDOG_PID"]) != os.getpid():
            return None
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000


def watchdog_service(reactor: IReactorTime, environ: Mapping[str, str] | None = None) -> TimerService | None:
    """
    A service that sends ``WATCHDOG=1`` every :func:`watchdog_interval`
    seconds while it runs, from the reactor thread: a reactor that stops
    turning stops the pings, and systemd restarts the server (with
    ``WatchdogSec=`` and ``Restart=on-failure``).

    :param reactor: times the pings.
    :param environ: where to look up the watchdog and notification
        variables; read now, so they may be removed from the environment
        afterwards. ``os.environ`` by default.
    :return: an unstarted ``IService``, or ``None`` when systemd does not
        watch this process.
    """
    env = os.environ if environ is None else environ
    interval = watchdog_interval(env)
    if interval is None:
        return None
    from twisted.application.internet import TimerService

    service = TimerService(interval, notify, "WATCHDOG=1", {"NOTIFY_SOCKET": env.get("NOTIFY_SOCKET", "")})
    service.clock = reactor
    return service


def child_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """
    ``environ`` without :data:`SERVICE_VARIABLES`, for the processes the
    server starts (init programs, handlers): they must not notify systemd in
    the server's name nor look for sockets passed to it.
    """
    return {name: value for name, value in environ.items() if name not in SERVICE_VARIABLES}
