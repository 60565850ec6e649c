# -*- test-case-name: tests.e2e.test_processes -*-
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

The attributes are those :class:`kapow.handlers.processes.GroupProcess`
gives :func:`os.posix_spawnp`: a new process group, an empty signal mask and the
given signals back to their default. They are prepared once by
:class:`Spawn`, and the file actions once per layout of descriptors
(:meth:`Spawn.file_actions`); each spawn only reads them, which POSIX allows
from several threads at once. A route's command line (:func:`c_program`)
and the environment every handler shares (:class:`SharedStrings`) are
converted once too, in the reactor's thread, so that a spawning thread holds
the interpreter lock as briefly as it can.

:func:`eventfd_signaller` goes the other way: a system call that keeps the
lock, for a thread that must not give it up.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable, Sequence

# <spawn.h> flags: the same values in glibc and musl on Linux
POSIX_SPAWN_SETPGROUP = 0x02
POSIX_SPAWN_SETSIGDEF = 0x04
POSIX_SPAWN_SETSIGMASK = 0x08

# Room for the opaque types, larger than any C library's (glibc: 336, 80 and 128 bytes).
_ATTR_SIZE = 1024
_ACTIONS_SIZE = 1024
_SIGSET_SIZE = 256

#: File actions as :func:`os.posix_spawnp` takes them: ``(os.POSIX_SPAWN_DUP2,
#: fd, new_fd)`` and ``(os.POSIX_SPAWN_CLOSE, fd)``, in order.
FileSteps = tuple[tuple[int, ...], ...]

#: Layouts of descriptors whose file actions are kept for the next spawns.
KEPT_FILE_ACTIONS = 64

#: Command lines kept converted for the next spawns (:func:`c_program`).
KEPT_PROGRAMS = 64

_POINTER_SIZE = ctypes.sizeof(ctypes.c_char_p)


#: A NULL-terminated ``char *[]``, as ``argv`` and ``envp``.
CStrings = ctypes.Array[ctypes.c_char_p]


def c_strings(strings: Sequence[bytes]) -> CStrings:
    """``strings`` as a NULL-terminated ``char *[]``."""
    return (ctypes.c_char_p * (len(strings) + 1))(*strings, None)


class SharedStrings:
    """
    Strings that many spawns start their ``char *[]`` with (the part of the
    environment every handler has), converted once: each spawn's array is a
    copy of their pointers with its own strings after them, which costs a
    fraction of converting them all again.
    """

    def __init__(self, strings: list[bytes]) -> None:
        #: kept as long as this: every copy points into them
        self.strings = strings
        #: the pointers to them, as the bytes an array of them starts with
        self._pointers = bytes((ctypes.c_char_p * len(strings))(*strings))

    def followed_by(self, more: Sequence[bytes]) -> CStrings:
        """A NULL-terminated ``char *[]`` of these strings and ``more``; valid while this lives."""
        n = len(self.strings)
        # copied from bytes, holding the interpreter lock throughout (a
        # ctypes.memmove would let go of it, and a spawning thread could take it)
        array = (ctypes.c_char_p * (n + len(more) + 1)).from_buffer_copy(
            self._pointers + bytes(_POINTER_SIZE * (len(more) + 1))
        )
        for i, string in enumerate(more, n):
            array[i] = string
        return array


@functools.lru_cache(maxsize=KEPT_PROGRAMS)
def c_program(executable: bytes | str, argv: tuple[bytes | str, ...]) -> tuple[bytes, CStrings]:
    """
    ``executable`` and ``argv`` as :class:`Spawn` takes them, converted once
    for the same ones: every handler of a route runs the same command line.
    The C library only reads the array, so spawns may share it.
    """
    return os.fsencode(executable), c_strings([os.fsencode(a) for a in argv])


def unavailable() -> str | None:
    """Why :class:`Spawn` cannot work on this system, or ``None`` if it can."""
    if not sys.platform.startswith("linux"):
        return "flag values are known for Linux only"
    try:
        _libc().posix_spawnp  # noqa: B018  # AttributeError: a C library without it
    except (OSError, AttributeError) as e:
        return str(e)
    return None


def eventfd_signaller() -> Callable[[int], int]:
    """
    ``signal(fd)`` adds 1 to the eventfd ``fd``, from any thread, without
    letting go of the interpreter lock (``eventfd_write`` of the C library as a
    :class:`ctypes.PyDLL` function). :func:`os.eventfd_write` lets go of it for
    the system call: a thread that then has to wait to take it back, only to
    wait for its next job right after, costs both threads two context switches
    for a write of a few microseconds.
    """
    write = ctypes.PyDLL(None).eventfd_write
    write.argtypes = (ctypes.c_int, ctypes.c_uint64)
    write.restype = ctypes.c_int
    return lambda fd: write(fd, 1)


def _libc() -> ctypes.CDLL:
    # the C library the interpreter runs on, found without ldconfig (a process)
    return ctypes.CDLL(None, use_errno=True)


class FileActions:
    """
    A ``posix_spawn_file_actions_t`` made from :data:`FileSteps`.

    :ivar kept: kept by its :class:`Spawn` for other spawns, which frees it
        when it is closed; otherwise freed by :meth:`release` after its one spawn.
    """

    def __init__(self, libc: ctypes.CDLL, steps: FileSteps, kept: bool) -> None:
        self._libc = libc
        self.kept = kept
        self.buffer: ctypes.Array[ctypes.c_char] | None = ctypes.create_string_buffer(_ACTIONS_SIZE)
        _check(libc.posix_spawn_file_actions_init(self.buffer), "posix_spawn_file_actions_init")
        for step in steps:
            if step[0] == os.POSIX_SPAWN_DUP2:
                _check(libc.posix_spawn_file_actions_adddup2(self.buffer, step[1], step[2]), "adddup2")
            elif step[0] == os.POSIX_SPAWN_CLOSE:
                _check(libc.posix_spawn_file_actions_addclose(self.buffer, step[1]), "addclose")
            else:
                raise ValueError(f"unknown file action {step!r}")

    def release(self) -> None:
        """Free it, unless it is kept for other spawns."""
        if not self.kept:
            self.free()

    def free(self) -> None:
        """Free it; no spawn may be using it."""
        if self.buffer is not None:
            self._libc.posix_spawn_file_actions_destroy(self.buffer)
            self.buffer = None


class Spawn:
    """
    A prepared ``posix_spawnp``: ``Spawn(reset_signals)(executable, argv,
    env, actions)`` starts ``executable`` as the leader of a new process group and
    returns its pid, from any thread.

    :raises OSError: from the constructor, if the C library lacks what is needed.
    """

    def __init__(self, reset_signals: Sequence[int]) -> None:
        why = unavailable()
        if why is not None:
            raise OSError(why)
        libc = _libc()
        self._libc = libc
        self._spawnp = libc.posix_spawnp
        self._attr = ctypes.create_string_buffer(_ATTR_SIZE)
        self._kept: dict[FileSteps, FileActions] = {}
        defaults = ctypes.create_string_buffer(_SIGSET_SIZE)
        empty = ctypes.create_string_buffer(_SIGSET_SIZE)
        _check(libc.sigemptyset(defaults), "sigemptyset")
        _check(libc.sigemptyset(empty), "sigemptyset")
        for signum in reset_signals:
            _check(libc.sigaddset(defaults, signum), "sigaddset")
        _check(libc.posix_spawnattr_init(self._attr), "posix_spawnattr_init")
        # the group of its own is the child's pid: the attribute's group is 0 from posix_spawnattr_init
        flags = POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF
        _check(libc.posix_spawnattr_setflags(self._attr, ctypes.c_short(flags)), "posix_spawnattr_setflags")
        _check(libc.posix_spawnattr_setsigmask(self._attr, empty), "posix_spawnattr_setsigmask")
        _check(libc.posix_spawnattr_setsigdefault(self._attr, defaults), "posix_spawnattr_setsigdefault")
        # kept for the life of the prepared attributes, which C code still reads
        self._destroy: Callable[..., int] | None = libc.posix_spawnattr_destroy

    def file_actions(self, steps: FileSteps) -> FileActions:
        """
        The file actions of ``steps``: the same object for the same steps
        (up to :data:`KEPT_FILE_ACTIONS` layouts), else one of its own to
        :meth:`~FileActions.release` after its spawn. Call it from one thread only.
        """
        actions = self._kept.get(steps)
        if actions is None:
            actions = FileActions(self._libc, steps, kept=len(self._kept) < KEPT_FILE_ACTIONS)
            if actions.kept:
                self._kept[steps] = actions
        return actions

    def __call__(self, executable: bytes, argv: CStrings, env: CStrings, actions: FileActions) -> int:
        """
        Start ``executable`` (found on ``PATH`` unless it names a path) with
        ``argv`` (as :func:`c_program` makes them), the environment ``env``
        (``NAME=value`` entries, as :func:`c_strings` or
        :meth:`SharedStrings.followed_by` make it) and the descriptors
        ``actions`` sets up; its pid. Raises :class:`OSError` if it cannot run.
        """
        pid = ctypes.c_int()
        err = self._spawnp(ctypes.byref(pid), executable, actions.buffer, self._attr, argv, env)
        if err:
            raise OSError(err, os.strerror(err))
        return pid.value

    def close(self) -> None:
        """Free the C library's part of what was prepared; no spawn may be running."""
        if self._destroy is not None:
            destroy, self._destroy = self._destroy, None
            destroy(self._attr)
            kept, self._kept = self._kept, {}
            for actions in kept.values():
                actions.free()


def _check(result: int, what: str) -> None:
    """``result`` of a C library call that returns 0 on success."""
    if result:
        raise OSError(f"{what} failed ({result})")
