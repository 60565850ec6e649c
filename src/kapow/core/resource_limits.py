"""
Resource limits of handler processes (``limits`` of a route, ``--limit`` of
``kapow route add`` and ``kapow server``): what they are, how they are
written, and the command line that runs a program under them.

A limit must be in force from the handler's first instruction: set on a
child that already runs, it is a race that a child forking at once wins. So
the handler is started through a small program that sets the limits on
itself and then executes the handler's program in its place (the same
process, hence the same pid and process group): the native ``kapow`` client
(``kapow --with-limits NAME=VALUE ... -- PROGRAM ARGS``) or, where it was not
built, util-linux's ``prlimit``. Measured here (``bench/bench_limits.py``):
a start without limits 0.8 ms, through the native client 0.4 ms more,
through ``prlimit`` 0.9 ms more; forking the server to set the limits in
the child (``preexec_fn``) costs about 9 ms, the copy of a server-sized
process. Routes without limits are started as before.

Standard library only, and nothing but :mod:`os`: ``kapow route add
--limit`` parses limits with it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

#: The limits a route may set (:data:`kapow.core.routes.LIMIT_NAMES`, which
#: checks them), in the order they are applied, with the ``prlimit`` option of each.
NAMES = {
    "memory": "--as",  # RLIMIT_AS
    "cpu": "--cpu",  # RLIMIT_CPU
    "open_files": "--nofile",  # RLIMIT_NOFILE
    "file_size": "--fsize",  # RLIMIT_FSIZE
    "processes": "--nproc",  # RLIMIT_NPROC
}

#: The limits given in bytes, which take K, M and G suffixes on the command line.
SIZES = ("memory", "file_size")

#: The largest value of any limit (:data:`kapow.core.routes.MAX_LIMIT`).
MAXIMUM = 2**62

_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class InvalidLimit(ValueError):
    """A limit is refused; the message says why, in one line."""


def parse_size(text: str) -> int:
    """
    A number of bytes with an optional K, M or G suffix (powers of 1024):
    ``2K`` is 2048.

    :raises ValueError: if it is not a whole number, with or without one.
    """
    digits, scale = text.strip(), 1
    if digits[-1:].upper() in _SUFFIXES:
        digits, scale = digits[:-1], _SUFFIXES[digits[-1:].upper()]
    if not digits.isascii() or not digits.isdigit():
        raise ValueError(f"invalid size {text!r} (a whole number of bytes, or with K, M or G)")
    return int(digits) * scale


def parse_limit(text: str) -> tuple[str, int]:
    """
    One ``--limit`` of the command line: ``NAME=VALUE``, sizes with an
    optional K, M or G suffix (powers of 1024): ``memory=256M``, ``cpu=10``.

    :raises InvalidLimit: for an unknown name or a value that is not a
        whole number from 1 to :data:`MAXIMUM`.
    """
    name, eq, value = text.partition("=")
    name = name.strip()
    if not eq:
        raise InvalidLimit(f"--limit {text!r}: expected NAME=VALUE, e.g. memory=256M")
    if name not in NAMES:
        raise InvalidLimit(f"--limit {text!r}: unknown limit {name!r} (known: {', '.join(NAMES)})")
    value = value.strip()
    try:
        if name in SIZES:
            number = parse_size(value)
        elif value.isascii() and value.isdigit():
            number = int(value)
        else:
            raise ValueError(value)
    except ValueError:
        unit = " (a number of bytes, or with K, M or G)" if name in SIZES else ""
        raise InvalidLimit(f"--limit {text!r}: {name} must be a whole number{unit}") from None
    if not 1 <= number <= MAXIMUM:
        raise InvalidLimit(f"--limit {text!r}: {name} must be from 1 to {MAXIMUM}")
    return name, number


def parse_limits(texts: Sequence[str]) -> dict[str, int]:
    """Every ``--limit`` of a command line; a later one of a name wins."""
    found = dict(parse_limit(text) for text in texts)
    return {name: found[name] for name in NAMES if name in found}


def soft_and_hard(name: str, value: int) -> tuple[int, int]:
    """
    The soft and hard limit a value stands for: both the value, except for
    ``cpu``, whose hard limit is one second later, so that SIGXCPU (at the
    soft limit) comes before SIGKILL (at the hard one).
    """
    return (value, value + 1) if name == "cpu" else (value, value)


class LimitedCommand:
    """
    Makes the argument vector that runs a program under resource limits.

    :param native: the native ``kapow`` client, which has the
        ``--with-limits`` mode; ``None`` if it was not built.
    :param prlimit: util-linux's ``prlimit``, used when there is no native
        client; ``None`` if there is none either.
    """

    def __init__(self, native: str | None, prlimit: str | None) -> None:
        self.native = native
        self.prlimit = prlimit

    @classmethod
    def find(cls, native: str | None) -> LimitedCommand | None:
        """The way this system has, or ``None`` if it has none."""
        prlimit = _which("prlimit")
        if native is None and prlimit is None:
            return None
        return cls(native, prlimit)

    def argv(self, limits: Mapping[str, int], program: str, args: Sequence[str]) -> list[str]:
        """
        Run ``program`` (a path) with ``args`` (its whole argv, the 0th
        included) under ``limits``.
        """
        if self.native is not None:
            words = [f"{name}={limits[name]}" for name in NAMES if name in limits]
            return [self.native, "--with-limits", *words, "--", program, *args[1:]]
        assert self.prlimit is not None
        options = []
        for name in NAMES:
            if name in limits:
                soft, hard = soft_and_hard(name, limits[name])
                options.append(f"{NAMES[name]}={soft}:{hard}")
        return [self.prlimit, *options, "--", program, *args[1:]]


def _which(name: str) -> str | None:
    for directory in [*os.environ.get("PATH", os.defpath).split(os.pathsep), "/usr/bin", "/bin"]:
        path = os.path.join(directory or ".", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None
