# -*- test-case-name: tests.unit.test_streams -*-
"""
A byte stream cut into lines, as WebSocket messages and events take them.
"""

from __future__ import annotations

__all__ = ["Lines"]


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
