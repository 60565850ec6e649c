"""
The parts of a user request a handler reads, as bytes: query parameters,
cookies, and the buffered body, which outlives the request.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator, Sequence
from typing import IO, BinaryIO
from urllib.parse import unquote_to_bytes


def first_cookie(headers: Sequence[bytes], name: bytes) -> bytes | None:
    """The first cookie called ``name`` (browsers send the most specific first)."""
    for key, value in cookie_pairs(headers):
        if key == name:
            return value
    return None


def cookie_pairs(headers: Sequence[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """Every (name, value) of ``Cookie`` headers, in order."""
    for header in headers:
        for pair in header.split(b";"):
            key, eq, value = pair.strip().partition(b"=")
            if eq:
                yield key, value


#: a ``%`` not followed by two hex digits: Go's ``url.QueryUnescape`` refuses it
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def query_pairs(uri: bytes) -> list[tuple[bytes, bytes]]:
    """
    The (name, value) pairs of the query of ``uri``, percent-decoded, as
    bytes, the way Go's ``url.ParseQuery`` reads them (the reference's
    view): ``&`` separates them, a ``+`` is a space, a pair without ``=``
    has an empty value, and a pair with a ``;`` or a broken percent-escape
    (``%zz``) is dropped. twisted.web's ``request.args`` splits on ``;`` too.
    """
    query = uri.partition(b"?")[2]
    pairs = []
    for pair in query.split(b"&"):
        if not pair or b";" in pair or (b"%" in pair and _BAD_ESCAPE.search(pair)):
            continue
        name, _, value = pair.partition(b"=")
        pairs.append(
            (unquote_to_bytes(name.replace(b"+", b" ")), unquote_to_bytes(value.replace(b"+", b" ")))
        )
    return pairs


class BodySnapshot:
    """
    The buffered request body, kept by the handler: twisted.web closes the
    request's own copy when the client goes away, and a handler that keeps
    running may still read it. Every reader gets a position of its own.

    :param content: ``request.content``: a ``BytesIO`` for small bodies, an
        unlinked temporary file otherwise.
    :ivar size: the body's size in bytes.
    """

    def __init__(self, content: IO[bytes]) -> None:
        self._data: bytes | None = None
        self._fd: int | None = None
        if isinstance(content, io.BytesIO):
            self._data = content.getvalue()
            self.size = len(self._data)
        else:
            self._fd = os.dup(content.fileno())
            self.size = os.fstat(self._fd).st_size

    def open(self) -> BinaryIO:
        """A new reader from the start of the body."""
        if self._fd is None:
            return io.BytesIO(self._data or b"")
        return open(f"/proc/self/fd/{self._fd}", "rb")

    def descriptor(self) -> int:
        """
        A new read-only descriptor at the start of the body, with a file
        position of its own; the caller closes it.
        """
        if self._fd is not None:
            return os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
        fd = os.memfd_create("kapow-body", os.MFD_CLOEXEC)
        try:
            view = memoryview(self._data or b"")
            while view:
                view = view[os.write(fd, view) :]
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        """Release the body; readers already open keep working."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._data = None
