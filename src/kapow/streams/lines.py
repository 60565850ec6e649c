# -*- test-case-name: tests.unit.test_streams -*-
"""
What both kinds of stream share: a process's output cut into lines, as
WebSocket messages and events take them, and paused while the client's
connection is full.
"""

from __future__ import annotations

from twisted.internet.interfaces import IProcessTransport, IPushProducer
from zope.interface import implementer

__all__ = ["Lines", "ProcessOutput"]


@implementer(IPushProducer)
class ProcessOutput:
    """Pauses a process's stdout while the client's connection is full (registered with the request)."""

    def __init__(self, process: IProcessTransport) -> None:
        self.process = process

    def pauseProducing(self) -> None:
        self.process.pauseProducing()  # type: ignore[attr-defined]  # both providers' transports are producers

    def resumeProducing(self) -> None:
        self.process.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        pass  # the client left: the handler's owner ends the process group


class Lines:
    """
    Cuts what a process writes into lines, without their ``\\n`` or
    ``\\r\\n``. A line longer than ``longest`` bytes is cut there, so that
    what waits for its line end stays bounded.

    :param longest: the most bytes one line may have.
    """

    def __init__(self, longest: int) -> None:
        self.longest = longest
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The lines that ``data`` completes."""
        lines = (self._partial + data).split(b"\n")
        partial = lines.pop()
        out = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        while len(partial) > self.longest:
            out.append(partial[: self.longest])
            partial = partial[self.longest :]
        self._partial = partial
        return [piece for line in out for piece in self._cut(line)]

    def rest(self) -> bytes | None:
        """What is left without a line end (the stream ended), or ``None``."""
        partial, self._partial = self._partial, b""
        return partial or None

    def _cut(self, line: bytes) -> list[bytes]:
        if len(line) <= self.longest:
            return [line]
        return [line[i : i + self.longest] for i in range(0, len(line), self.longest)]
