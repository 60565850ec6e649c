"""Form fields and uploaded files of an HTTP request body.

:func:`parse_form` turns a buffered request body into a :class:`ParsedForm`:
the data behind the ``/request/form/{name}``, ``/request/files/{name}/filename``
and ``/request/files/{name}/content`` resources.

Two encodings are understood, whatever the request method:

* ``application/x-www-form-urlencoded``: every pair becomes a field;
* ``multipart/form-data``: a part whose ``Content-Disposition`` carries a
  ``filename`` parameter (even an empty one) is a file, any other part is a
  field.

Any other (or no) content type yields an empty form.  Both encodings are parsed
by python-multipart's streaming parsers, fed from the body file in chunks, so
the body is never held in memory as a whole.  File contents are spooled: kept
in memory up to ``max_memory_file`` bytes and moved to an anonymous temporary
file beyond that.  Non-file field values are kept in memory.
"""

from __future__ import annotations

import email.message
import io
import os
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, BinaryIO, Self, TypeVar

from python_multipart import MultipartParser, QuerystringParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["FormError", "ParsedForm", "UploadedFile", "parse_form"]

URLENCODED = b"application/x-www-form-urlencoded"
MULTIPART = b"multipart/form-data"

DEFAULT_CHUNK_SIZE = 65536
DEFAULT_MAX_MEMORY_FILE = 1 << 20

_RFC2231_CHARSETS = ("utf-8", "us-ascii")

_T = TypeVar("_T")


class FormError(ValueError):
    """The body does not follow its declared form encoding.

    Raised by :func:`parse_form` for a ``multipart/form-data`` body without a
    usable boundary, with broken framing, or cut short before its closing
    boundary.  The message is a single line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class _PositionalReader(io.RawIOBase):
    """Read-only raw stream over a file descriptor with a position of its own.

    It reads with :func:`os.pread` from a private duplicate of the descriptor, so
    several readers of the same file never move each other, and each one stays
    valid until closed even if the original descriptor is closed meanwhile.
    """

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self._fd = os.dup(fd)
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        self._checkClosed()
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self._size - self._pos)
        if wanted <= 0:
            return 0
        data = os.pread(self._fd, wanted, self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._pos + offset
        elif whence == io.SEEK_END:
            position = self._size + offset
        else:
            raise ValueError(f"invalid whence: {whence!r}")
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._pos = position
        return position

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def fileno(self) -> int:
        self._checkClosed()
        return self._fd

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


class _Spool:
    """Write-once storage of one uploaded file's content.

    Bytes accumulate in memory while their total stays within ``max_memory``;
    the first write that would exceed it moves everything to an anonymous
    temporary file, where the rest goes too.
    """

    def __init__(self, max_memory: int) -> None:
        self._max_memory = max_memory
        self._buffer: bytearray | None = bytearray()
        self._data: bytes | None = None
        self._file: BinaryIO | None = None
        self._closed = False
        self.size = 0

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def write(self, data: bytes) -> None:
        if self._file is None:
            assert self._buffer is not None
            if len(self._buffer) + len(data) <= self._max_memory:
                self._buffer += data
                self.size += len(data)
                return
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 (owned until close)
            self._file.write(self._buffer)
            self._buffer = None
        self._file.write(data)
        self.size += len(data)

    def finish(self) -> None:
        if self._file is None:
            assert self._buffer is not None
            self._data = bytes(self._buffer)
            self._buffer = None
        else:
            self._file.flush()

    def open(self) -> BinaryIO:
        if self._closed:
            raise ValueError("uploaded file has been released")
        if self._file is None:
            assert self._data is not None
            return io.BytesIO(self._data)
        return io.BufferedReader(_PositionalReader(self._file.fileno(), self.size))

    def close(self) -> None:
        self._closed = True
        self._buffer = None
        self._data = None
        if self._file is not None:
            self._file.close()


@dataclass(frozen=True)
class UploadedFile:
    """One file part of a ``multipart/form-data`` body.

    :ivar field: the form field name the part was sent under.
    :ivar filename: the file name the client sent, decoded as UTF-8 (undecodable
        bytes replaced), reduced to its last path component: everything up to the
        last ``/`` or ``\\`` is dropped, as Go's ``multipart.FileHeader`` does, so
        a name like ``../../etc/passwd`` arrives as ``passwd``.  It may be empty.
        An RFC 2231 ``filename*`` parameter in UTF-8 or US-ASCII takes precedence
        over a plain ``filename``.
    :ivar content_type: the part's ``Content-Type`` header, or ``None``.
    :ivar size: the content length in bytes.
    """

    field: str
    filename: str
    content_type: str | None
    size: int
    _spool: _Spool = dataclass_field(repr=False, compare=False, kw_only=True)

    @property
    def in_memory(self) -> bool:
        """``True`` while the content is held in memory, ``False`` once it lives
        in a temporary file on disk."""
        return self._spool.in_memory

    def open(self) -> BinaryIO:
        """Return a new readable binary file over the content, positioned at 0.

        Every call returns an independent reader: reading or seeking one never
        moves another, and the content can be read any number of times.  The
        caller closes the reader.  A reader over content on disk has a
        :meth:`~io.IOBase.fileno` (its own descriptor of the temporary file);
        one over in-memory content has none.  A reader opened before :meth:`ParsedForm.close`
        remains readable; calling this afterwards raises :class:`ValueError`.
        """
        return self._spool.open()

    def read(self) -> bytes:
        """Return the whole content as bytes (meant for small files)."""
        with self.open() as reader:
            return reader.read()


@dataclass
class ParsedForm:
    """Fields and files of one request body.

    :ivar fields: field name to its values, in arrival order.  Values (and
        names) are decoded as UTF-8 with undecodable bytes replaced.
    :ivar files: field name to its uploaded files, in arrival order.

    The form owns the uploaded files' storage: :meth:`close` (or leaving a
    ``with`` block) releases it.
    """

    fields: dict[str, list[str]] = dataclass_field(default_factory=dict)
    files: dict[str, list[UploadedFile]] = dataclass_field(default_factory=dict)

    def field(self, name: str) -> str | None:
        """Return the first value of field ``name``, or ``None`` if absent."""
        values = self.fields.get(name)
        return values[0] if values else None

    def file(self, name: str) -> UploadedFile | None:
        """Return the first file uploaded as ``name``, or ``None`` if absent."""
        uploads = self.files.get(name)
        return uploads[0] if uploads else None

    def close(self) -> None:
        """Release the storage of every uploaded file; safe to call repeatedly."""
        for uploads in self.files.values():
            for upload in uploads:
                upload._spool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def parse_form(
    content_type: bytes | str | None,
    body: BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_memory_file: int = DEFAULT_MAX_MEMORY_FILE,
) -> ParsedForm:
    """Parse the form carried by a request body.

    :param content_type: the request's raw ``Content-Type`` header, parameters
        included (``boundary``, ``charset``); ``None`` when absent.
    :param body: the whole request body as a readable, seekable binary file.  It
        is read from offset 0 whatever its current position, and left wherever
        reading ended.
    :param chunk_size: how many bytes to read from ``body`` at a time.
    :param max_memory_file: the largest uploaded file content kept in memory;
        bigger content goes to a temporary file.
    :returns: a :class:`ParsedForm`, empty unless the media type is
        ``application/x-www-form-urlencoded`` or ``multipart/form-data``.  The
        caller owns it and should :meth:`~ParsedForm.close` it.
    :raises FormError: for a multipart body without a boundary parameter, with
        broken framing, or missing its closing boundary.  Files spooled so far
        are released first.

    Urlencoded bodies are split on ``&`` only; a pair without ``=`` is a field
    with an empty value; ``+`` and percent escapes are decoded, invalid escapes
    are kept literally.  The ``charset`` parameter is ignored: text is UTF-8.

    In multipart bodies, parts are form-data parts as RFC 7578 describes them:
    a part that is not ``form-data`` or has no ``name`` is skipped, as Go's
    ``multipart.Reader.ReadForm`` does.  Part bodies are taken verbatim
    (``Content-Transfer-Encoding`` is ignored, RFC 7578 §4.7).  Non-file values
    are kept in memory.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, not {chunk_size!r}")
    if max_memory_file < 0:
        raise ValueError(f"max_memory_file must be >= 0, not {max_memory_file!r}")
    media_type, params = parse_options_header(content_type)
    if media_type == URLENCODED:
        return _parse_urlencoded(body, chunk_size)
    if media_type == MULTIPART:
        return _parse_multipart(params, body, chunk_size, max_memory_file)
    return ParsedForm()


def _feed(body: BinaryIO, chunk_size: int, write: Callable[[bytes], object]) -> None:
    body.seek(0)
    while chunk := body.read(chunk_size):
        write(chunk)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _unquote_plus(raw: bytes) -> str:
    return _text(urllib.parse.unquote_to_bytes(raw.replace(b"+", b" ")))


def _add(mapping: dict[str, list[_T]], key: str, value: _T) -> None:
    mapping.setdefault(key, []).append(value)


def _parse_urlencoded(body: BinaryIO, chunk_size: int) -> ParsedForm:
    form = ParsedForm()
    name: list[bytes] = []
    value: list[bytes] = []

    def on_field_name(data: bytes, start: int, end: int) -> None:
        name.append(data[start:end])

    def on_field_data(data: bytes, start: int, end: int) -> None:
        value.append(data[start:end])

    def on_field_end() -> None:
        _add(form.fields, _unquote_plus(b"".join(name)), _unquote_plus(b"".join(value)))
        name.clear()
        value.clear()

    parser = QuerystringParser(
        callbacks={
            "on_field_name": on_field_name,
            "on_field_data": on_field_data,
            "on_field_end": on_field_end,
        }
    )
    _feed(body, chunk_size, parser.write)
    parser.finalize()
    return form


def _basename(filename: str) -> str:
    """Return the last path component of a client-sent file name.

    Both ``/`` and ``\\`` count as separators; trailing separators are ignored,
    so ``"dir/sub/"`` gives ``"sub"``.  A name made only of separators gives
    ``""``.
    """
    return filename.replace("\\", "/").rstrip("/").rpartition("/")[2]


def _extended_filename(disposition: bytes) -> str | None:
    """Decode an RFC 2231 ``filename*`` parameter, if there is a usable one."""
    text = disposition.decode("latin-1")
    if "filename*" not in text.lower():
        return None
    message = email.message.Message()
    message["Content-Disposition"] = text
    decoded = None
    for key, value in message.get_params([], header="content-disposition"):
        if key.lower() == "filename" and isinstance(value, tuple):
            charset, _language, raw = value
            if (charset or "").lower() in _RFC2231_CHARSETS:
                decoded = raw.encode("latin-1").decode(charset, errors="replace")
    return decoded


class _MultipartBuilder:
    """Callbacks of a :class:`MultipartParser` that build a :class:`ParsedForm`."""

    def __init__(self, max_memory_file: int) -> None:
        self.form = ParsedForm()
        self.ended = False
        self._max_memory_file = max_memory_file
        self._spools: list[_Spool] = []
        self._header_name: list[bytes] = []
        self._header_value: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._sink: Callable[[bytes], None] | None = None
        self._finish: Callable[[], None] | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def release(self) -> None:
        for spool in self._spools:
            spool.close()

    def on_part_begin(self) -> None:
        self._headers = {}
        self._sink = None
        self._finish = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name.append(data[start:end])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value.append(data[start:end])

    def on_header_end(self) -> None:
        name = b"".join(self._header_name).strip().lower()
        self._headers[name] = b"".join(self._header_value).strip(b" \t")
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        disposition_header = self._headers.get(b"content-disposition", b"")
        disposition, params = parse_options_header(disposition_header)
        raw_name = params.get(b"name")
        if disposition != b"form-data" or not raw_name:
            return
        name = _text(raw_name)
        filename = _extended_filename(disposition_header)
        if filename is None and b"filename" in params:
            filename = _text(params[b"filename"])
        if filename is None:
            self._start_field(name)
        else:
            raw_type = self._headers.get(b"content-type")
            content_type = raw_type.decode("latin-1") if raw_type is not None else None
            self._start_file(name, _basename(filename), content_type)

    def _start_field(self, name: str) -> None:
        pieces: list[bytes] = []
        self._sink = pieces.append

        def finish() -> None:
            _add(self.form.fields, name, _text(b"".join(pieces)))

        self._finish = finish

    def _start_file(self, name: str, filename: str, content_type: str | None) -> None:
        spool = _Spool(self._max_memory_file)
        self._spools.append(spool)
        self._sink = spool.write

        def finish() -> None:
            spool.finish()
            upload = UploadedFile(
                field=name,
                filename=filename,
                content_type=content_type,
                size=spool.size,
                _spool=spool,
            )
            _add(self.form.files, name, upload)

        self._finish = finish

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._sink is not None:
            self._sink(data[start:end])

    def on_part_end(self) -> None:
        if self._finish is not None:
            self._finish()
        self._sink = None
        self._finish = None

    def on_end(self) -> None:
        self.ended = True


def _parse_multipart(
    params: dict[bytes, bytes],
    body: BinaryIO,
    chunk_size: int,
    max_memory_file: int,
) -> ParsedForm:
    boundary = params.get(b"boundary")
    if not boundary:
        raise FormError("multipart/form-data without a boundary parameter")
    builder = _MultipartBuilder(max_memory_file)
    try:
        try:
            parser = MultipartParser(boundary, callbacks=builder.callbacks())
            _feed(body, chunk_size, parser.write)
            parser.finalize()
        except FormParserError as exc:
            raise FormError(f"malformed multipart body: {exc}") from exc
        if not builder.ended:
            raise FormError("truncated multipart body: no closing boundary")
    except BaseException:
        builder.release()
        raise
    return builder.form
