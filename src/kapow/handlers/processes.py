# -*- test-case-name: tests.e2e.test_processes -*-
"""
Starting children the way handlers need them, beneath Twisted's
:class:`~twisted.internet.interfaces.IReactorProcess`: every child leads a
process group of its own, with the signals this process ignores back to
their default, and with the descriptors of ``childFDs`` and no other.

A group, not a session: the group is what ending a handler signals, and
what the server's own group (``kill -- -PGID``, a terminal's Ctrl-C) does
not reach. A session of its own would also put each child in a scheduling
group of its own where Linux's autogroup is on (``kernel.sched_autogroup_enabled``,
the default of desktop and many server kernels): the scheduler then shares
the processors equally between the server with all its threads and each of
its running handlers, so that 30 live handlers leave the server's reactor a
thirty-first of them, and the requests waiting on it the longest tails.

:class:`ReactorProcesses` is the plain Twisted way: each child is a
:class:`GroupProcess`, Twisted's own :class:`~twisted.internet.process.Process`
passing ``setpgroup=0`` to :func:`os.posix_spawnp`, spawned in the reactor's
thread, reaped when the reactor catches ``SIGCHLD``, its pipes read by
Twisted's readers. :class:`kapow.handlers.fast_processes.FastProcesses` is
the faster way beneath the same interface; the same protocol tests run
against both (tests/e2e/test_processes.py).

Every descriptor of this process from 3 up must be close-on-exec, which
Python makes them from birth (PEP 446); :func:`prepare_children` makes it so,
at a provider's first spawn, for the few a process may inherit without
(systemd's sockets), and finds the signals to reset.
"""

from __future__ import annotations

import fcntl
import os
import signal
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import AnyStr

from twisted.internet import process as _process
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IProcessProtocol, IReactorFDSet, IReactorProcess
from zope.interface import implementer

__all__ = [
    "NO_ENVIRONMENT",
    "STDIO_PIPES",
    "Environ",
    "GroupProcess",
    "ReactorProcesses",
    "close_on_exec_from",
    "encoded_environ",
    "exit_reason",
    "ignored_signals",
    "pidfds_work",
    "prepare_children",
]

#: ``env`` not given: an empty environment, as ``IReactorProcess`` has it on POSIX.
NO_ENVIRONMENT: Mapping[str, str] = MappingProxyType({})

#: ``childFDs`` not given: pipes to stdin, stdout and stderr, as ``IReactorProcess`` has it.
STDIO_PIPES: Mapping[int, int | str] = MappingProxyType({0: "w", 1: "r", 2: "r"})


def close_on_exec_from(lowest: int) -> None:
    """Make every open descriptor from ``lowest`` up close-on-exec."""
    for fd in _process._listOpenFDs():
        if fd >= lowest:
            try:
                flags = fcntl.fcntl(fd, fcntl.F_GETFD)
                if not flags & fcntl.FD_CLOEXEC:
                    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            except OSError:
                pass  # the descriptor of the listing itself, closed by now


def ignored_signals() -> tuple[int, ...]:
    """The signals this process ignores (SIGPIPE, SIGXFSZ, and any inherited)."""
    return tuple(s for s in range(1, signal.NSIG) if signal.getsignal(s) == signal.SIG_IGN)


def prepare_children() -> tuple[int, ...]:
    """
    What a provider makes sure of at its first spawn (no descriptor from 3
    up is inherited); the signals to reset in every child.
    """
    close_on_exec_from(3)
    return ignored_signals()


def pidfds_work() -> bool:
    """Whether this system can watch a process's exit through a pidfd."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def exit_reason(status: int | None) -> BaseException:
    """How a process ended, from its wait status (``None``: reaped elsewhere, how is unknown)."""
    if status is None:
        return ProcessTerminated()
    if os.WIFSIGNALED(status):
        return ProcessTerminated(None, os.WTERMSIG(status), status)
    code = os.WEXITSTATUS(status)
    return ProcessTerminated(code, None, status) if code else ProcessDone(status)


# -- the plain Twisted way ---------------------------------------------------------


class GroupProcess(_process.Process):
    """
    A :class:`~twisted.internet.process.Process` that leads a new process group.
    Only the descriptors of ``childFDs`` are set up in the child; every
    other one of the parent from 3 up must be close-on-exec.

    :param reset_signals: signals to set back to their default in the child
        (the ones the parent ignores).
    :ivar pgid: its process group (its pid); unlike ``pid``, kept after the
        process was reaped.
    """

    pgid: int

    def __init__(
        self,
        reactor: IReactorFDSet,
        executable: str,
        args: list[str],
        environment: Mapping[str, str] | Mapping[bytes, bytes] | None,
        path: str | None,
        proto: IProcessProtocol,
        childFDs: dict[int, int | str],
        reset_signals: Sequence[int] = (),
    ) -> None:
        self._reset_signals = reset_signals
        super().__init__(reactor, executable, args, environment, path, proto, childFDs=childFDs)

    # Twisted's private hook (twisted.internet.process, 23.8 and later),
    # pinned by tests/e2e/test_spawn.py.
    def _trySpawnInsteadOfFork(
        self,
        path: str | None,
        uid: int | None,
        gid: int | None,
        executable: str,
        args: list[str],
        environment: Mapping[str, str] | Mapping[bytes, bytes] | None,
        kwargs: Mapping[str, dict[int, int]],
    ) -> bool:
        if uid is not None or gid is not None or path is not None:
            raise ValueError("uid, gid and path are not supported")
        fdmap = kwargs.get("fdmap") or {}
        fdState = []
        for fd in {0, 1, 2, *fdmap, *fdmap.values()}:
            try:
                fdState.append((fd, bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)))
            except OSError:
                pass  # not open
        self.pid = self.pgid = os.posix_spawnp(
            executable,
            args,
            os.environ if environment is None else environment,
            file_actions=_process._getFileActions(
                fdState, fdmap, doClose=_process._PS_CLOSE, doDup2=_process._PS_DUP2
            ),
            setsigdef=self._reset_signals,
            setpgroup=0,
        )
        self.status = -1
        return True


@implementer(IReactorProcess)
class ReactorProcesses:
    """
    Children as Twisted's own processes (:class:`GroupProcess`), each in a
    process group of its own: spawned in the reactor's thread, reaped at
    ``SIGCHLD``, their pipes read by the reactor.

    :param reactor: a POSIX reactor.
    """

    def __init__(self, reactor: IReactorFDSet) -> None:
        self.reactor = reactor
        self._reset_signals: tuple[int, ...] | None = None

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[AnyStr, AnyStr] | None = NO_ENVIRONMENT,  # type: ignore[assignment]  # empty: fits str and bytes
        path: bytes | str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> GroupProcess:
        """
        :meth:`IReactorProcess.spawnProcess` without ``path``, ``uid``,
        ``gid`` and ``usePTY`` (:class:`ValueError`).

        :raises OSError: if the program cannot be started.
        """
        if path is not None or uid is not None or gid is not None or usePTY:
            raise ValueError("path, uid, gid and usePTY are not supported")
        if self._reset_signals is None:
            self._reset_signals = prepare_children()
        return GroupProcess(
            self.reactor,
            os.fsdecode(executable),
            [os.fsdecode(a) for a in args],
            env,
            None,
            processProtocol,
            childFDs=dict(STDIO_PIPES if childFDs is None else childFDs),
            reset_signals=self._reset_signals,
        )


# -- environments ----------------------------------------------------------------


class Environ(dict[str, str]):
    """
    A child's environment that keeps its ``NAME=value`` entries, encoded
    once: :class:`~kapow.handlers.fast_processes.FastProcesses` hands them to
    the C library as they are (any other mapping is encoded at each spawn).
    Read it, never change it: :meth:`adding` makes one with a variable more,
    which shares this one's entries.

    :ivar shared: the entries it shares with those :meth:`adding` made.
    :ivar own: the entries it has on top of them.
    """

    def __init__(self, variables: Mapping[str, str] = NO_ENVIRONMENT) -> None:
        super().__init__(variables)
        self.shared: list[bytes] = encoded_environ(self)
        self.own: tuple[bytes, ...] = ()

    @property
    def entries(self) -> list[bytes]:
        """All its ``NAME=value`` entries."""
        return [*self.shared, *self.own]

    def adding(self, name: str, value: str) -> Environ:
        """This environment with ``name`` set to ``value``."""
        entry = os.fsencode(f"{name}={value}")
        extended = Environ.__new__(Environ)
        dict.__init__(extended, self)
        dict.__setitem__(extended, name, value)
        if name in self:  # its entry goes: nothing is shared
            prefix = os.fsencode(name) + b"="
            extended.shared = [e for e in self.entries if not e.startswith(prefix)]
            extended.own = (entry,)
        else:
            extended.shared, extended.own = self.shared, (*self.own, entry)
        return extended


def encoded_environ(env: Mapping[str, str] | Mapping[bytes, bytes]) -> list[bytes]:
    """``env`` as ``NAME=value`` entries."""
    return [os.fsencode(name) + b"=" + os.fsencode(value) for name, value in env.items()]
