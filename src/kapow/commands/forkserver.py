"""
``kapow route`` without an interpreter start per call.

An init program runs ``kapow route add`` once per route, so the server is not
ready before the last call ends. Each call of the command line pays for an
interpreter start and the import of :mod:`ssl` (together about 40 ms here)
for about 7 ms of work. This process is started once by the server, with
the command line imported and OpenSSL initialised: the native client, asked
for ``kapow route ...``, connects to its socket (``kapow-cli.sock`` beside
the client, in the server's private launcher directory) and passes its
standard descriptors, working directory, arguments and environment; the
process forks a child that runs the command with them and sends back its
exit status, which the native client exits with. Where the socket is not
there (the Python data client, or a worker's handlers), the native client
runs the full command line, ``kapow-cli``, as before.

The request, written by the client: a 4-byte big-endian length, then that
many bytes of NUL-terminated fields — the number of arguments in decimal,
the arguments, the working directory, then ``NAME=VALUE`` environment
entries — with descriptors 0, 1 and 2 passed (``SCM_RIGHTS``) beside its
first byte. The answer: one byte, the exit status. A child that dies without
answering closes the connection; the client then reports it.

Run as ``python -I -S forkserver.py PACKAGE_PARENT`` (the directory that
holds the ``kapow`` package) with the listening socket as descriptor 3 and
a pipe from the server as standard input: the end of that pipe (the server
stopped or died) ends this process. It needs only the standard library.
"""

import os
import select
import signal
import socket
import sys

#: The longest request accepted (arguments and environment).
MAX_REQUEST = 4 << 20


def _read_request(conn: socket.socket) -> tuple[list[int], list[bytes]]:
    """(fds, fields) of the request on ``conn``."""
    head, fds, _flags, _addr = socket.recv_fds(conn, 4, 3)
    while len(head) < 4:
        more = conn.recv(4 - len(head))
        if not more:
            raise EOFError("request cut short")
        head += more
    size = int.from_bytes(head[:4], "big")
    if size > MAX_REQUEST or len(fds) != 3:
        raise ValueError("malformed request")
    chunks, got = [], 0
    while got < size:
        chunk = conn.recv(min(size - got, 1 << 16))
        if not chunk:
            raise EOFError("request cut short")
        chunks.append(chunk)
        got += len(chunk)
    fields = b"".join(chunks).split(b"\0")
    if fields[-1:] != [b""]:
        raise ValueError("malformed request")
    return fds, fields[:-1]


def _run(conn: socket.socket) -> int:
    """In the child: take over the caller's descriptors, directory,
    arguments and environment, run the command, and return its status."""
    fds, fields = _read_request(conn)
    argc = int(fields[0])
    argv = [os.fsdecode(f) for f in fields[1 : 1 + argc]]
    cwd = fields[1 + argc]
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    for entry in fields[2 + argc :]:
        name, sep, value = entry.partition(b"=")
        if sep and name:
            os.environb[name] = value
    sys.argv = argv
    from kapow.cli import main

    try:
        status = main(argv)
    except SystemExit as e:  # argparse's --help
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            sys.stderr.write(f"{e.code}\n")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    return status


def _child(conn: socket.socket) -> None:
    status = 1
    try:
        status = _run(conn)
    except BaseException:
        import traceback

        traceback.print_exc()
    try:
        conn.sendall(bytes([status & 0xFF]))
    finally:
        os._exit(0)


def serve(listening: socket.socket, watched: int) -> None:
    """Fork a child for every connection on ``listening`` until ``watched``
    (the pipe from the server) ends."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    both: list[socket.socket | int] = [listening, watched]
    while True:
        ready, _, _ = select.select(both, [], [])
        if watched in ready:
            return
        try:
            conn, _ = listening.accept()
        except (BlockingIOError, InterruptedError):
            continue
        if os.fork() == 0:
            listening.close()
            os.close(watched)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _child(conn)
        conn.close()


def main(argv: list[str]) -> None:
    """``forkserver.py PACKAGE_PARENT LISTENING_FD``: serve the command-line
    calls that connect to the listening socket at descriptor ``LISTENING_FD``."""
    sys.path.insert(0, argv[1])
    # what every call needs, imported and initialised once
    import ssl

    import kapow.cli
    import kapow.commands.control_call
    import kapow.commands.handlers
    import kapow.commands.routes
    import kapow.core.resource_limits
    import kapow.core.traffic  # noqa: F401  (imported for the children; `kapow route` imports lazily)

    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    watched = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    listening = socket.socket(fileno=int(argv[2]))
    listening.setblocking(False)
    serve(listening, watched)


if __name__ == "__main__":
    main(sys.argv)
