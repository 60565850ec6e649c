"""
``posix_spawnp`` called through the C library, so that a thread can wait in it
without holding the interpreter lock.

``posix_spawn`` returns only once the child has executed its program (glibc
and musl suspend the caller, ``vfork`` style, until then), which takes a
fraction of a millisecond on an idle machine and more under load.
:func:`os.posix_spawnp` holds the interpreter lock all along, so a reactor
that spawns a handler per request waits that long at every spawn, whichever
thread calls it. A foreign call through :mod:`ctypes` releases the lock: a
spawn in a worker thread leaves the reactor serving other requests
meanwhile (measured here on 2 cores: a spawning web server served about
1.75 times as many requests at 8 concurrent clients).

The attributes are those :func:`kapow.handlers.spawn.spawn_watched` gives
:func:`os.posix_spawnp`: a new session, an empty signal mask, the given
signals back to their default, and one descriptor as 0, 1 and 2. They are
prepared once by :class:`Spawn` and only read by each spawn, which POSIX
allows from several threads at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Sequence

# <spawn.h> flags: the same values in glibc and musl on Linux
POSIX_SPAWN_SETSIGDEF = 0x04
POSIX_SPAWN_SETSIGMASK = 0x08
POSIX_SPAWN_SETSID = 0x80

# Room for the opaque types, larger than any C library's (glibc: 336, 80 and 128 bytes).
_ATTR_SIZE = 1024
_ACTIONS_SIZE = 1024
_SIGSET_SIZE = 256


class Spawn:
    """
    A prepared ``posix_spawnp``: ``Spawn(stdio, reset_signals)(argv, env)``
    starts ``argv`` and returns its pid, from any thread. A handler with its
    own stdin gets file actions of its own.

    :raises OSError: from the constructor, if the C library lacks what is needed.
    """

    def __init__(self, stdio: int, reset_signals: Sequence[int]) -> None:
        if not sys.platform.startswith("linux"):
            raise OSError("flag values are known for Linux only")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self._libc = libc
        self._stdio = stdio
        self._spawnp = libc.posix_spawnp
        self._attr = ctypes.create_string_buffer(_ATTR_SIZE)
        self._actions = ctypes.create_string_buffer(_ACTIONS_SIZE)
        defaults = ctypes.create_string_buffer(_SIGSET_SIZE)
        empty = ctypes.create_string_buffer(_SIGSET_SIZE)
        _check(libc.sigemptyset(defaults), "sigemptyset")
        _check(libc.sigemptyset(empty), "sigemptyset")
        for signum in reset_signals:
            _check(libc.sigaddset(defaults, signum), "sigaddset")
        _check(libc.posix_spawnattr_init(self._attr), "posix_spawnattr_init")
        flags = POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF
        _check(libc.posix_spawnattr_setflags(self._attr, ctypes.c_short(flags)), "posix_spawnattr_setflags")
        _check(libc.posix_spawnattr_setsigmask(self._attr, empty), "posix_spawnattr_setsigmask")
        _check(libc.posix_spawnattr_setsigdefault(self._attr, defaults), "posix_spawnattr_setsigdefault")
        _check(libc.posix_spawn_file_actions_init(self._actions), "posix_spawn_file_actions_init")
        for target in (0, 1, 2):
            _check(libc.posix_spawn_file_actions_adddup2(self._actions, stdio, target), "adddup2")
        # kept for the life of the prepared attributes, which C code still reads
        self._destroy: tuple[Callable[..., int], Callable[..., int]] | None = (
            libc.posix_spawnattr_destroy,
            libc.posix_spawn_file_actions_destroy,
        )

    def __call__(self, argv: Sequence[str], env: Sequence[bytes], stdin: int | None = None) -> int:
        """
        Start ``argv`` with the environment ``env`` (``NAME=value`` entries),
        and ``stdin`` as its 0 when given; its pid. Raises :class:`OSError`
        if it cannot run.
        """
        args = [os.fsencode(a) for a in argv]
        c_argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
        c_env = (ctypes.c_char_p * (len(env) + 1))(*env, None)
        pid = ctypes.c_int()
        actions = self._actions if stdin is None else self._file_actions(stdin)
        try:
            err = self._spawnp(ctypes.byref(pid), args[0], actions, self._attr, c_argv, c_env)
        finally:
            if actions is not self._actions:
                self._libc.posix_spawn_file_actions_destroy(actions)
        if err:
            raise OSError(err, os.strerror(err))
        return pid.value

    def _file_actions(self, stdin: int) -> ctypes.Array[ctypes.c_char]:
        actions = ctypes.create_string_buffer(_ACTIONS_SIZE)
        _check(self._libc.posix_spawn_file_actions_init(actions), "posix_spawn_file_actions_init")
        for source, target in ((stdin, 0), (self._stdio, 1), (self._stdio, 2)):
            _check(self._libc.posix_spawn_file_actions_adddup2(actions, source, target), "adddup2")
        return actions

    def close(self) -> None:
        """Free the C library's part of the prepared attributes."""
        if self._destroy is not None:
            destroy_attr, destroy_actions = self._destroy
            self._destroy = None
            destroy_attr(self._attr)
            destroy_actions(self._actions)


def _check(result: int, what: str) -> None:
    """``result`` of a C library call that returns 0 on success."""
    if result:
        raise OSError(f"{what} failed ({result})")
