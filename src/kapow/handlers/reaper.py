"""
The reaper: a small process beside the server that ends whatever the
server's handlers left running once the server is gone, however it ended
(SIGKILL and crashes included).

It is started by :class:`kapow.handlers.containment.Containment` with the write end
of a pipe as the only link: the server never writes anything that matters
on it, and when every holder of the write end is gone (the server and,
without a cgroup, its workers) the reaper reads end-of-file. Then:

- with a cgroup (the argument is its directory): every process in it and in
  the cgroups below it is killed at once through ``cgroup.kill`` (Linux
  5.14+; before that, each one listed in ``cgroup.procs`` gets SIGKILL until
  none is left), then the directories are removed. A handler's children
  cannot leave a cgroup, whatever session or process group they make.
- without one (the argument is ``-``): the server sent, one per line,
  ``url <data URL>`` for its data listeners; every process whose environment
  names one of them as ``KAPOW_DATA_URL`` and holds ``KAPOW_HANDLER_ID`` (a
  handler and everything it started) or ``KAPOW_CONTROL_CLIENT_CERT`` (an
  init program) gets SIGKILL, until a scan finds none.

A line ``quiet`` says the server failed to start and said why itself:
the reaper then reaps without a word.

No Twisted here: this starts in a few milliseconds and imports nothing heavy.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

#: Rounds of killing before giving up on processes that keep appearing.
ROUNDS = 50
#: Seconds to wait for a killed cgroup to empty.
EMPTY_WAIT = 5.0


def kill_cgroup(path: str) -> int:
    """
    Kill every process in the cgroup ``path`` and below it.

    :return: how many processes were in it.
    """
    count = len(cgroup_pids(path))
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    except FileNotFoundError:  # before Linux 5.14
        for _ in range(ROUNDS):
            pids = cgroup_pids(path)
            if not pids:
                break
            for pid in pids:
                _kill(pid)
            time.sleep(0.01)
    except OSError:
        return count  # gone already
    return count


def cgroup_pids(path: str) -> list[int]:
    """Every process in the cgroup ``path`` and the cgroups below it."""
    pids: list[int] = []
    for here, _dirs, files in os.walk(path):
        if "cgroup.procs" in files:
            try:
                with open(os.path.join(here, "cgroup.procs")) as f:
                    pids.extend(int(line) for line in f if line.strip())
            except OSError:
                pass  # removed meanwhile
    return pids


def remove_cgroup(path: str, wait: float = EMPTY_WAIT) -> bool:
    """
    Remove the cgroup ``path`` and those below it once they are empty (a
    killed process leaves its cgroup only when it is fully gone).

    :return: whether it is gone.
    """
    deadline = time.monotonic() + wait
    while True:
        for here, _dirs, _files in sorted(os.walk(path), key=lambda entry: -len(entry[0])):
            try:
                os.rmdir(here)
            except FileNotFoundError:
                pass
            except OSError:
                break  # still populated: try again shortly
        if not os.path.isdir(path):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def marked_processes(urls: set[bytes], exclude: int) -> list[int]:
    """
    The processes (``exclude`` aside) that a handler or an init program of a
    server whose data listeners are ``urls`` started, by their environment.
    """
    markers = [b"\0KAPOW_DATA_URL=" + url + b"\0" for url in urls]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == exclude:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = b"\0" + f.read() + b"\0"
        except OSError:
            continue  # gone, or not ours to read
        if (b"\0KAPOW_HANDLER_ID=" in environ or b"\0KAPOW_CONTROL_CLIENT_CERT=" in environ) and any(
            marker in environ for marker in markers
        ):
            found.append(int(entry))
    return found


def kill_marked(urls: set[bytes]) -> int:
    """SIGKILL :func:`marked_processes` until none is left; how many there were."""
    killed: set[int] = set()
    for _ in range(ROUNDS):
        pids = marked_processes(urls, os.getpid())
        pids = [pid for pid in pids if _kill(pid)]
        if not pids:
            break
        killed.update(pids)
        time.sleep(0.01)
    return len(killed)


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def main(argv: list[str]) -> int:
    """``python -m kapow.handlers.reaper CGROUP|- [SERVER_PID]``: wait for end-of-file on stdin, then reap."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        # the terminal's and the service manager's signals are for the server;
        # this ends by itself right after it
        signal.signal(sig, signal.SIG_IGN)
    cgroup = argv[1] if len(argv) > 1 and argv[1] != "-" else None
    server = int(argv[2]) if len(argv) > 2 else os.getppid()
    try:
        exited: int | None = os.pidfd_open(server)
    except (AttributeError, OSError):
        exited = None
    if exited is not None and os.getppid() != server:  # gone already (and its pid maybe reused)
        os.close(exited)
        exited = None
    urls: set[bytes] = set()
    quiet = False
    stdin = sys.stdin.buffer
    for line in iter(stdin.readline, b""):
        kind, _, value = line.rstrip(b"\n").partition(b" ")
        if kind == b"url" and value:
            urls.add(value)
        elif kind == b"quiet":  # the server failed to start and said why itself
            quiet = True
    if exited is not None:
        # end-of-file comes as the server closes its files, before it has
        # left its cgroup: wait until it is gone
        select.select([exited], [], [])
    if cgroup is not None:
        count = kill_cgroup(cgroup)
        remove_cgroup(cgroup)
    else:
        count = kill_marked(urls) if urls else 0
    if count and not quiet:
        sys.stderr.write(
            f"kapow reaper: the server (pid {server}) is gone: killed {count} processes it left\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
