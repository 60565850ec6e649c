"""
The live processes of this machine, as ``/proc`` shows them: the one place
that reads ``/proc/PID/stat``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator


def processes() -> Iterator[tuple[int, bytes, int]]:
    """
    ``(pid, state, process group)`` of every process that can be read now;
    one that ends while it is read is left out.
    """
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            # pid (comm) state ppid pgrp ...: comm may hold spaces and parens
            state, _ppid, pgrp = stat[stat.rfind(b")") + 2 :].split()[:3]
            yield int(entry), state, int(pgrp)
        except (OSError, ValueError):
            continue


def live_members(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that are not zombies."""
    return [pid for pid, state, pgrp in processes() if pgrp == pgid and state != b"Z"]
