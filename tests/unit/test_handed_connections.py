"""
kapow.data.handoff.HandedConnections, a worker's end of the socket that
connections to ``--data-bind`` come over: each descriptor served once and
closed, whatever the serving did, and the reader put away when the main
process is gone. Real sockets; the reactor is a MemoryReactor.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator

import pytest
from twisted.internet.testing import MemoryReactor

from kapow.data.handoff import HandedConnections


def closed(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return True
    return False


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield ours, theirs
    ours.close()
    theirs.close()


def test_each_connection_is_served_and_closed_here(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    reactor = MemoryReactor()
    adopted: list[tuple[int, int]] = []

    def adopt(fd: int, family: int) -> None:
        adopted.append((fd, family))
        if family == socket.AF_INET6:
            raise OSError("not served")  # logged; the descriptor is closed all the same

    worker = HandedConnections(reactor, theirs.detach(), adopt)
    worker.startService()
    assert reactor.readers == {worker}
    sent = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
    for fd, family in zip(sent, (socket.AF_INET, socket.AF_INET6, socket.AF_INET), strict=True):
        socket.send_fds(ours, [bytes([family])], [fd])
    worker.doRead()
    assert [family for _, family in adopted] == [socket.AF_INET, socket.AF_INET6, socket.AF_INET]
    assert all(closed(fd) for fd, _ in adopted)
    ours.close()  # the main process is gone
    worker.doRead()
    assert reactor.readers == set()
    worker.stopService()
    for fd in sent:
        os.close(fd)
