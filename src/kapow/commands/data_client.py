"""``kapow get`` / ``kapow set`` / ``kapow unset``: the lean client of the data API.

These verbs run several times inside every request a handler serves, so
their start-up time is the product's latency.  This module therefore imports
only ``sys``, ``posix`` (the C module behind :mod:`os`, already loaded by the
interpreter; :mod:`os` itself costs about 1 ms more) and ``_socket`` (the C
module behind :mod:`socket`, which costs ~9 ms through :mod:`enum`), and speaks
a minimal HTTP/1.1 by hand.  Nothing from Twisted, ``http.client``, ``json`` or
``argparse`` may be imported here, directly or indirectly; a test checks it.
Nothing of the ``kapow`` package either: the handlers' launcher
(:mod:`kapow.commands.launcher`) loads this file as the top-level module
``data_client``.

This module is also the definition of the native client
(``src/kapow/native/kapow.c``), which handlers get when it was built: both
work on bytes from end to end (arguments, environment, URL, answers,
messages), with rules simple enough to be the same in C, and the tests run
every case against both and compare them on random input.

Command line (options may also follow the arguments, see :func:`_parse_args`)::

    kapow get [--data-url URL] [--handler ID] RESOURCE
    kapow set [--data-url URL] [--handler ID] RESOURCE [VALUE]
    kapow unset [--data-url URL] [--handler ID] RESOURCE

Python API, for handlers written in Python::

    from kapow.commands.data_client import DataClient, DataAPIError
    client = DataClient()                 # $KAPOW_DATA_URL, $KAPOW_HANDLER_ID
    name = client.get("/request/params/name")
    client.set("/response/headers/Content-Type", "text/plain")
    with open("report.txt", "rb") as f:
        client.set("/response/body", f)   # streamed in chunks
    client.unset("/response/headers/X-Debug")

Wire protocol: ``GET``/``PUT``/``DELETE {prefix}/handlers/{id}{resource}``; 200 is
success, anything else carries ``{"reason": "..."}``, with a ``"detail"`` too
when the server knows more (printed ``kapow: REASON: DETAIL``).  A value written to
``/response/body`` or ``/response/stream`` from a stream is sent as a series of
appending ``PUT`` requests of at most 64 KiB each over one keep-alive
connection, each sent only after the previous one was answered: the server
answers a chunk once the user's connection has taken it, which is the flow
control that lets an endless producer stream in bounded memory.

The answers are read strictly enough to be the same whatever the timing: a
response head (or a chunk-size line) longer than 64 KiB, a status that is not
three digits, a ``Content-Length`` that is not digits and a chunk size that is
not hexadecimal digits are malformed; the reason and detail of a refusal are
looked for in the first 64 KiB of its body.
"""

import sys

try:
    import posix as _os
except ImportError:  # pragma: no cover - non-POSIX platforms
    import os as _os  # type: ignore[no-redef]  # the same functions, where there is no posix
import _socket

# typing.TYPE_CHECKING without importing typing, which this module needs
# only for annotations; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import Protocol

    class _Writer(Protocol):
        def write(self, data: bytes, /) -> object: ...

    class _Reader(Protocol):
        def read(self, size: int, /) -> bytes | str: ...


__all__ = ["DataAPIError", "DataClient", "is_lean_command", "main"]

DEFAULT_DATA_URL = "http://localhost:8082"
_STREAMING = (b"/response/body", b"/response/stream")
CHUNK_SIZE = 65536

_MAX_HEAD = 65536  # longest response head (status line + headers + CRLFCRLF), or chunk line
_MAX_REASON_BODY = 65536  # a refusal's reason and detail are looked for in this much of its body
_MAX_UNIX_PATH = 107  # sizeof(sun_path) - 1 on Linux
_MALFORMED = b"malformed response from the data API"
_CLOSED_EARLY = b"the data API closed the connection mid-response"
_NO_ANSWER = b"the data API closed the connection without answering"
_WHITESPACE = b" \t\n\r\x0b\x0c"  # what bytes.split() and bytes.strip() take away
_HEX = b"0123456789abcdefABCDEF"

USAGE = """\
usage: kapow get [--data-url URL] [--handler ID] RESOURCE
       kapow set [--data-url URL] [--handler ID] RESOURCE [VALUE]
       kapow unset [--data-url URL] [--handler ID] RESOURCE

Read a request resource, or write or remove a response resource, of the
running handler through the Kapow! data API. `get` writes the raw value to
stdout. Without VALUE, `set` reads the value from stdin; for /response/body
and /response/stream it is streamed as it arrives. `unset` removes every value
of a response header or cookie written so far.

Options may come before or after the arguments, but not in the place of
VALUE: the word after the RESOURCE of `set` is its VALUE, whatever it looks
like. After `--`, every word is an argument.

options:
  --data-url URL  data API (default: $KAPOW_DATA_URL, else {default})
                  http://HOST:PORT[/PREFIX] or http+unix://%2Fpath%2Fto%2Fsocket
  --handler ID    handler id (default: $KAPOW_HANDLER_ID)
  -h, --help      show this help and exit

example:
  name=$(kapow get /request/params/name)
  kapow set /response/headers/Content-Type text/plain
  echo "Hello, $name" | kapow set /response/body
""".replace("{default}", DEFAULT_DATA_URL)


def _text(data: bytes) -> str:
    """Bytes as text that turns back into the same bytes (see :func:`_bytes`)."""
    return data.decode("utf-8", "surrogateescape")


def _bytes(text: str | bytes | bytearray) -> bytes:
    """Text (a ``str`` from :func:`_text`, ``sys.argv`` or the environment) as bytes."""
    if isinstance(text, str):
        return text.encode("utf-8", "surrogateescape")
    return bytes(text)


class DataAPIError(Exception):
    """A data API call failed.

    ``status`` is the HTTP status of the refusal, or ``None`` when the data API
    could not be reached or broke the protocol; ``reason`` is the server's
    reason text (or a description of the failure); ``detail`` is what the
    server said besides (``None`` when it said nothing more).  ``str()`` is
    ``REASON: DETAIL``, or ``REASON`` without a detail, as ``kapow get``
    prints it.
    """

    def __init__(self, status: int | None, reason: str | bytes, detail: str | bytes | None = None) -> None:
        reason = _text(reason) if isinstance(reason, bytes) else reason
        detail = _text(detail) if isinstance(detail, bytes) else detail
        super().__init__(status, reason, detail)
        self.status = status
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return self.reason if self.detail is None else "%s: %s" % (self.reason, self.detail)


class _PeerClosed(Exception):
    """The connection ended before a single byte of the response arrived."""


def _invalid(data: bytes) -> ValueError:
    return ValueError(_text(data))


def _quote(data: bytes) -> bytes:
    """``data`` in double quotes, with every byte outside printable ASCII
    (and ``"`` and ``\\``) written as ``\\xNN``."""
    out = bytearray(b'"')
    for c in data:
        if 0x20 <= c < 0x7F and c != 0x22 and c != 0x5C:
            out.append(c)
        else:
            out += b"\\x%02x" % c
    out.append(0x22)
    return bytes(out)


def _getenv(name: str) -> bytes | None:
    os_module = sys.modules.get("os")
    if os_module is not None:  # honour changes made through os.environ
        value = os_module.environ.get(name)
        return None if value is None else _bytes(value)
    return _os.environ.get(name.encode())  # posix.environ has bytes keys and values


def _percent_decode(data: bytes) -> bytes:
    if b"%" not in data:
        return data
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c == 0x25 and _is_hex(data[i + 1 : i + 3]):
            out.append(int(data[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(c)
            i += 1
    return bytes(out)


def _is_hex(digits: bytes, size: int = 2) -> bool:
    return len(digits) == size and all(c in _HEX for c in digits)


def _path_bytes(data: bytes, what: bytes) -> bytes:
    """``data`` as request-target bytes; only what HTTP cannot carry is escaped.

    Refuses whitespace and control characters (they would end or split the
    request line).  Non-ASCII bytes and ``?``/``#`` (which would start a query
    or fragment) are percent-encoded; everything else is sent as given.
    """
    out = bytearray()
    for c in data:
        if c <= 0x20 or c == 0x7F:
            raise _invalid(b"invalid %s %s: whitespace or control character" % (what, _quote(data)))
        if c >= 0x80 or c == 0x3F or c == 0x23:
            out += b"%%%02X" % c
        else:
            out.append(c)
    return bytes(out)


def _resource_bytes(resource: object) -> bytes:
    if not isinstance(resource, (str, bytes, bytearray)):
        raise TypeError("resource must be str, not %s" % type(resource).__name__)
    resource = _bytes(resource)
    if not resource.startswith(b"/"):
        raise _invalid(b"invalid resource %s: it must start with '/'" % _quote(resource))
    return _path_bytes(resource, b"resource")


def _parse_data_url(url: bytes) -> tuple[bytes | tuple[bytes, int], bytes, bytes]:
    """-> (address, host header bytes, path prefix bytes); the address is a
    UNIX socket's path, or (host, port)."""

    def bad(why: bytes) -> ValueError:
        return _invalid(b"invalid data URL %s: %s" % (_quote(url), why))

    scheme, sep, rest = url.partition(b"://")
    scheme = scheme.lower()
    if not sep or scheme not in (b"http", b"http+unix"):
        raise bad(b"expected http://HOST:PORT or http+unix://SOCKET")
    netloc, slash, prefix = rest.partition(b"/")
    prefix = (slash + prefix).rstrip(b"/")
    for junk in (b"?", b"#"):
        if junk in prefix:
            prefix = prefix.partition(junk)[0].rstrip(b"/")
    if not netloc or b"@" in netloc:
        raise bad(b"bad host part")
    prefix_bytes = _path_bytes(prefix, b"data URL path")
    if scheme == b"http+unix":
        path = _percent_decode(netloc)
        if b"\0" in path:
            raise bad(b"bad socket path")
        return path, b"localhost", prefix_bytes
    if netloc.startswith(b"["):
        host, bracket, port_text = netloc[1:].partition(b"]")
        if not bracket or (port_text and not port_text.startswith(b":")):
            raise bad(b"bad IPv6 address")
        port_text = port_text[1:]
    else:
        host, _, port_text = netloc.partition(b":")
    if not host:
        raise bad(b"no host")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise bad(b"bad port")
        port = int(port_text)
    else:
        port = 80
    return (host, port), _path_bytes(netloc, b"data URL host"), prefix_bytes


class _Connection:
    """One HTTP/1.1 connection: raw requests out, parsed responses in."""

    __slots__ = ("buf", "close_after", "sock")

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.close_after = False

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes, body: bytes) -> None:
        sock = self.sock
        if len(body) <= CHUNK_SIZE:
            sock.sendall(data + body)
        else:
            sock.sendall(data)
            sock.sendall(body)

    def read_head(self) -> tuple[int, bytes, dict[bytes, bytes]]:
        """-> (status, reason bytes, {lowercase name: value bytes})."""
        while True:
            status, reason, headers, version = self._read_one_head()
            if 100 <= status < 200 and status != 101:
                continue  # interim response (100 Continue, 103 ...)
            break
        connection = headers.get(b"connection", b"").lower()
        if version == b"HTTP/1.0":
            self.close_after = b"keep-alive" not in connection
        else:
            self.close_after = b"close" in connection
        return status, reason, headers

    def _read_until(self, mark: bytes, first: bool) -> bytes:
        """The bytes before ``mark`` (consumed with it); it must end within
        _MAX_HEAD bytes.  ``first``: an end of the connection before any byte
        is _PeerClosed, and a failing recv there is the OSError itself."""
        buf = self.buf
        start = 0
        while True:
            end = buf.find(mark, start)
            if end >= 0:
                if end + len(mark) > _MAX_HEAD:
                    raise DataAPIError(None, _MALFORMED)
                self.buf = buf[end + len(mark) :]
                return buf[:end]
            if len(buf) >= _MAX_HEAD:
                raise DataAPIError(None, _MALFORMED)
            start = max(0, len(buf) - len(mark) + 1)
            try:
                data = self.sock.recv(CHUNK_SIZE)
            except OSError:
                if buf and first:  # part of an answer came: never a case for a retry
                    raise DataAPIError(None, _CLOSED_EARLY) from None
                raise
            if not data:
                if not buf and first:
                    raise _PeerClosed()
                raise DataAPIError(None, _CLOSED_EARLY)
            buf += data

    def _read_one_head(self) -> tuple[int, bytes, dict[bytes, bytes], bytes]:
        lines = self._read_until(b"\r\n\r\n", True).split(b"\r\n")
        parts = lines[0].split(None, 2)
        if (
            len(parts) < 2
            or not parts[0].startswith(b"HTTP/")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            raise DataAPIError(None, _MALFORMED)
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        reason = parts[2].strip() if len(parts) > 2 else b""
        return int(parts[1]), reason, headers, parts[0]

    def body(self, status: int, headers: dict[bytes, bytes]) -> "Iterator[bytes]":
        """Yield the response body in chunks of at most CHUNK_SIZE bytes."""
        if status in (204, 304):
            return
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            yield from self._chunked()
            return
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                raise DataAPIError(None, _MALFORMED)
            yield from self._exactly(int(length))
            return
        self.close_after = True
        buf, self.buf = self.buf, b""
        if buf:
            yield buf
        while True:
            data = self.sock.recv(CHUNK_SIZE)
            if not data:
                return
            yield data

    def _exactly(self, remaining: int) -> "Iterator[bytes]":
        buf = self.buf
        if buf:
            take = buf[:remaining]
            self.buf = buf[remaining:]
            remaining -= len(take)
            if take:
                yield take
        recv = self.sock.recv
        while remaining > 0:
            data = recv(remaining if remaining < CHUNK_SIZE else CHUNK_SIZE)
            if not data:
                raise DataAPIError(None, _CLOSED_EARLY)
            remaining -= len(data)
            yield data

    def _line(self) -> bytes:
        return self._read_until(b"\r\n", False)

    def _chunked(self) -> "Iterator[bytes]":
        while True:
            size_text = self._line().partition(b";")[0].strip()
            if not size_text or not all(c in _HEX for c in size_text):
                raise DataAPIError(None, _MALFORMED)
            size = int(size_text, 16)
            if size == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                return
            yield from self._exactly(size)
            if self._line():
                raise DataAPIError(None, _MALFORMED)


_ESCAPES = {
    0x22: b'"', 0x5C: b"\\", 0x2F: b"/", 0x62: b"\b",
    0x66: b"\f", 0x6E: b"\n", 0x72: b"\r", 0x74: b"\t",
}  # fmt: skip


def _json_string(body: bytes, name: bytes) -> bytes | None:
    """The string of member ``name`` (``b"reason"``, ``b"detail"``) of a JSON
    error body as UTF-8 bytes, or None (no json module).  Raw bytes are kept
    as sent; a ``\\u`` escape of half a surrogate pair that has no other half
    becomes U+FFFD."""
    key = body.find(b'"' + name + b'"')
    if key < 0:
        return None
    i = key + len(name) + 2
    n = len(body)
    while i < n and body[i] in b" \t\r\n":
        i += 1
    if i >= n or body[i] != 0x3A:  # ':'
        return None
    i += 1
    while i < n and body[i] in b" \t\r\n":
        i += 1
    if i >= n or body[i] != 0x22:  # '"'
        return None
    i += 1
    out = bytearray()
    while i < n:
        end = i
        while end < n and body[end] != 0x22 and body[end] != 0x5C:
            end += 1
        out += body[i:end]
        if end >= n:
            return None
        if body[end] == 0x22:
            return bytes(out)
        if end + 1 >= n:
            return None
        c = body[end + 1]
        if c == 0x75:  # \uXXXX
            digits = body[end + 2 : end + 6]
            if not _is_hex(digits, 4):
                return None
            code = int(digits, 16)
            i = end + 6
            if 0xD800 <= code < 0xDC00 and body[i : i + 2] == b"\\u" and _is_hex(body[i + 2 : i + 6], 4):
                low = int(body[i + 2 : i + 6], 16)
                if 0xDC00 <= low < 0xE000:
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    i += 6
            if 0xD800 <= code < 0xE000:
                code = 0xFFFD
            out += chr(code).encode("utf-8")
        elif c in _ESCAPES:
            out += _ESCAPES[c]
            i = end + 2
        else:
            return None
    return None


def _one_line(data: bytes) -> bytes:
    return b" ".join(data.split()) if (b"\n" in data or b"\r" in data) else data


def _reason_of(status: int, reason: bytes, body: bytes) -> tuple[bytes, bytes | None]:
    """-> (reason, detail or None) of a refusal, each on one line: the JSON
    ``reason`` of ``body`` and its ``detail`` when it has one, else the
    status line's ``reason`` phrase (or the status) alone."""
    body = body[:_MAX_REASON_BODY]
    text = _json_string(body, b"reason")
    if not text:
        return _one_line(reason or b"HTTP status %d" % status), None
    detail = _json_string(body, b"detail")
    return _one_line(text), (_one_line(detail) if detail else None)


class DataClient:
    """Client of the data API for one handler.

    ``data_url`` defaults to ``$KAPOW_DATA_URL``, else ``http://localhost:8082``;
    ``handler_id`` to ``$KAPOW_HANDLER_ID`` (required: ``ValueError`` without
    it).  Both may be ``str`` or ``bytes``.  Every call opens its own
    connection (a streamed ``set`` keeps one for all its chunks).  Failures
    raise :class:`DataAPIError`; a malformed resource raises ``ValueError``.
    """

    def __init__(self, data_url: str | bytes | None = None, handler_id: str | bytes | None = None) -> None:
        if data_url is None:
            data_url = _getenv("KAPOW_DATA_URL") or DEFAULT_DATA_URL
        if handler_id is None:
            handler_id = _getenv("KAPOW_HANDLER_ID")
        if not handler_id:
            raise ValueError("no handler id: set KAPOW_HANDLER_ID or pass --handler")
        self._url = url = _bytes(data_url)
        self.data_url = _text(url)
        self.handler_id = _text(_bytes(handler_id))
        self._address, host, prefix = _parse_data_url(url)
        handler = _path_bytes(_bytes(handler_id), b"handler id")
        if b"/" in handler:
            raise _invalid(b"invalid handler id %s" % _quote(_bytes(handler_id)))
        self._base = prefix + b"/handlers/" + handler
        self._host = host

    # -- public API -------------------------------------------------------

    def get(self, resource: str | bytes) -> bytes:
        """Return the value of ``resource`` as bytes."""
        return b"".join(self.iter_get(resource))

    def get_into(self, resource: str | bytes, fileobj: "_Writer") -> int:
        """Stream the value of ``resource`` into ``fileobj`` (anything with
        ``write(bytes)``); return the number of bytes written.  Nothing is
        written when the server refuses."""
        total = 0
        write = fileobj.write
        for chunk in self.iter_get(resource):
            write(chunk)
            total += len(chunk)
        return total

    def iter_get(self, resource: str | bytes) -> "Iterator[bytes]":
        """Yield the value of ``resource`` in chunks; the status is checked
        (and :class:`DataAPIError` raised) before the first chunk."""
        return self._call(b"GET", resource)

    def unset(self, resource: str | bytes) -> None:
        """Remove ``resource`` (every value of a response header or cookie
        written so far)."""
        for _ in self._call(b"DELETE", resource):
            pass

    def _call(self, method: bytes, resource: str | bytes) -> "Iterator[bytes]":
        target = self._base + _resource_bytes(resource)
        conn = self._connect()
        try:
            try:
                conn.send(self._head(method, target, None, True), b"")
                status, reason, headers = conn.read_head()
            except _PeerClosed:
                raise DataAPIError(None, _NO_ANSWER) from None
            body = conn.body(status, headers)
            if status != 200:
                raise self._refusal(status, reason, body)
            yield from body
        except OSError as exc:
            raise self._broken(exc) from None
        finally:
            conn.close()

    def set(self, resource: str | bytes, value: "bytes | bytearray | memoryview | str | _Reader") -> None:
        """Write ``value`` (bytes, str, or a binary file object) to ``resource``.

        A file object written to ``/response/body`` or ``/response/stream`` is
        streamed: each chunk read from it becomes one appending PUT, sent once
        the previous one was acknowledged.  For any other resource the whole
        value is read and sent in one PUT (a header write adds one value per
        PUT, so it must be a single write)."""
        resource = _resource_bytes(resource)
        target = self._base + resource
        if isinstance(value, str):
            value = _bytes(value)
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        if isinstance(value, bytes):
            self._put_all(target, [value])
        elif hasattr(value, "read"):
            chunks = _read_chunks(value)
            if resource in _STREAMING:
                self._put_all(target, chunks)
            else:
                self._put_all(target, [b"".join(chunks)])
        else:
            kind = type(value).__name__
            raise TypeError("value must be bytes, str or a file object, not %s" % kind)

    # -- plumbing -----------------------------------------------------------

    def _head(self, method: bytes, target: bytes, length: int | None, close: bool) -> bytes:
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, self._host)
        if length is not None:
            head += b"Content-Type: application/octet-stream\r\n"
            head += b"Content-Length: %d\r\n" % length
        if close:
            head += b"Connection: close\r\n"
        return head + b"\r\n"

    def _connect(self) -> _Connection:
        address = self._address
        try:
            if isinstance(address, bytes):  # a UNIX socket's path
                if len(address) > _MAX_UNIX_PATH:
                    raise OSError("AF_UNIX path too long")
                sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                try:
                    sock.connect(address)
                except BaseException:
                    sock.close()
                    raise
                return _Connection(sock)
            host, port = address
            candidates: list[tuple[int, tuple[object, ...]]]
            if host.lower() == b"localhost":
                # loopback by definition (RFC 6761 6.3); spares the resolver
                # (~0.2 ms of NSS loading, a noticeable part of the budget)
                candidates = [
                    (_socket.AF_INET, ("127.0.0.1", port)),
                    (_socket.AF_INET6, ("::1", port, 0, 0)),
                ]
            else:
                # bytes: the name goes to the resolver as given (a str would
                # make getaddrinfo load the idna codec, which drags in `re`)
                candidates = [
                    (info[0], info[4]) for info in _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM)
                ]
            error: OSError | None = None
            for family, sockaddr in candidates:
                try:
                    sock = _socket.socket(family, _socket.SOCK_STREAM)
                except OSError as exc:
                    error = exc
                    continue
                try:
                    sock.connect(sockaddr)
                except OSError as exc:
                    sock.close()
                    error = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
                return _Connection(sock)
            assert error is not None  # getaddrinfo gives an address or raises
            raise error
        except OSError as exc:
            reason = b"cannot reach data API at %s: %s" % (self._url, _strerror(exc))
            raise DataAPIError(None, reason) from None

    def _broken(self, exc: OSError) -> DataAPIError:
        message = b"connection to data API at %s failed: %s"
        return DataAPIError(None, message % (self._url, _strerror(exc)))

    def _refusal(self, status: int, reason: bytes, body: "Iterator[bytes]") -> DataAPIError:
        data = b""
        try:
            for chunk in body:
                data += chunk
                if len(data) >= _MAX_REASON_BODY:
                    break
        except (OSError, DataAPIError):
            pass
        return DataAPIError(status, *_reason_of(status, reason, data))

    def _exchange(
        self, conn: _Connection, target: bytes, body: bytes
    ) -> tuple[int, bytes, dict[bytes, bytes]]:
        """Send one PUT on ``conn`` and return the response head."""
        try:
            conn.send(self._head(b"PUT", target, len(body), False), body)
        except OSError as send_error:
            # The server may have refused early and closed: its answer wins.
            try:
                return conn.read_head()
            except (OSError, _PeerClosed, DataAPIError):
                raise send_error from None
        return conn.read_head()

    def _put_all(self, target: bytes, chunks: "Iterable[bytes]") -> None:
        """PUT every chunk in turn over one keep-alive connection (at least
        one PUT, empty if there are no chunks), reconnecting when the server
        closed the connection between two of them."""
        conn = None
        sent = False
        try:
            for chunk in chunks:
                if chunk or not sent:
                    conn = self._put_one(conn, target, chunk)
                    sent = True
            if not sent:
                conn = self._put_one(conn, target, b"")
        finally:
            if conn is not None:
                conn.close()

    def _put_one(self, conn: _Connection | None, target: bytes, body: bytes) -> _Connection | None:
        while True:
            fresh = conn is None
            if conn is None:
                conn = self._connect()
            try:
                status, reason, headers = self._exchange(conn, target, body)
            except (OSError, _PeerClosed) as exc:
                # Nothing of an answer arrived.  On a kept-alive connection
                # that means the server had closed it: retry on a new one.
                conn.close()
                conn = None
                if not fresh:
                    continue
                if isinstance(exc, _PeerClosed):
                    raise DataAPIError(None, _NO_ANSWER) from None
                raise self._broken(exc) from None
            except BaseException:
                conn.close()
                raise
            try:
                response = conn.body(status, headers)
                if status != 200:
                    raise self._refusal(status, reason, response)
                for _ in response:
                    pass
            except OSError as exc:
                conn.close()
                raise self._broken(exc) from None
            except BaseException:
                conn.close()
                raise
            if conn.close_after:
                conn.close()
                return None
            return conn


def _read_chunks(fileobj: "_Reader") -> "Iterator[bytes]":
    """Yield the bytes of ``fileobj`` as they become available."""
    read = getattr(fileobj, "read1", None) or fileobj.read
    while True:
        chunk = read(CHUNK_SIZE)
        if not chunk:
            return
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8")
        yield chunk


def _strerror(exc: BaseException) -> bytes:
    """The C library's text for ``exc`` (``strerror``, ``gai_strerror``), as bytes."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return _bytes(text)


class _FdFile:
    """Unbuffered binary file over a raw descriptor (no io/os machinery)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read1(self, size: int) -> bytes:
        return _os.read(self.fd, size)

    read = read1

    def write(self, data: bytes) -> None:
        fd = self.fd
        view = memoryview(data)
        while view:
            view = view[_os.write(fd, view) :]


def _error(message: str | bytes, command: bytes = b"") -> int:
    """Write ``kapow COMMAND: MESSAGE`` (``kapow: MESSAGE`` without a command) as one line on stderr; return 1."""
    try:
        prefix = b"kapow %s: " % command if command else b"kapow: "
        _FdFile(2).write(prefix + _one_line(_bytes(message)) + b"\n")
    except OSError:
        pass
    return 1


def is_lean_command(argv: list[str]) -> bool:
    """True when ``argv`` (like ``sys.argv``) is ``kapow get``, ``kapow set``
    or ``kapow unset``, which :func:`main` handles without importing anything
    heavy."""
    return len(argv) > 1 and argv[1] in ("get", "set", "unset")


def _usage_error(what: bytes, command: bytes) -> ValueError:
    """What is wrong with the command line, pointing at the help of ``kapow COMMAND``."""
    return _invalid(b"%s (see kapow %s --help)" % (what, command))


def _parse_args(args: list[bytes], command: bytes) -> tuple[bytes | None, bytes | None, list[bytes]] | None:
    """-> (data_url, handler_id, positionals), all bytes, or None for help;
    raises ValueError naming what is wrong.

    Options may come before or after the positional arguments, but never in
    the place of ``set``'s VALUE: the word after its RESOURCE is the VALUE
    whatever it looks like, so that a value from a request (``--handler=...``)
    is never taken for an option; a ``--`` there is still the end of the
    options.  After ``--`` every word is positional."""
    data_url: bytes | None = None
    handler_id: bytes | None = None
    positionals: list[bytes] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == b"--":
            positionals.extend(args[i:])
            break
        if command == b"set" and len(positionals) == 1:
            positionals.append(arg)
            continue
        if arg in (b"-h", b"--help"):
            return None
        name, eq, value = arg.partition(b"=")
        if name in (b"--data-url", b"--handler"):
            if not eq:
                if i >= len(args):
                    raise _usage_error(b"option %s needs a value" % name, command)
                value = args[i]
                i += 1
            if name == b"--data-url":
                data_url = value
            else:
                handler_id = value
        elif arg.startswith(b"-") and arg != b"-":
            raise _usage_error(b"unknown option %s" % _quote(arg), command)
        else:
            positionals.append(arg)
    if not positionals:
        raise _usage_error(b"missing RESOURCE", command)
    limit = 2 if command == b"set" else 1
    if len(positionals) > limit:
        raise _usage_error(b"unexpected argument %s" % _quote(positionals[limit]), command)
    return data_url, handler_id, positionals


def main(argv: list[str]) -> int:
    """``kapow get`` / ``kapow set`` / ``kapow unset``; ``argv`` is like
    ``sys.argv``.  Returns the exit status: 0 on success, 1 on any failure
    (on stderr: ``kapow: REASON: DETAIL``, or ``kapow: REASON``, for what the
    data API answered or why it could not be reached, ``kapow COMMAND: ...``
    for the rest)."""
    if not is_lean_command(argv):
        return _error("expected 'get', 'set' or 'unset'")
    args = [_bytes(arg) for arg in argv[1:]]
    command = args[0]
    try:
        parsed = _parse_args(args[1:], command)
        if parsed is None:
            _FdFile(1).write(USAGE.encode("utf-8"))
            return 0
        data_url, handler_id, positionals = parsed
        client = DataClient(data_url, handler_id)
        resource = positionals[0]
        _resource_bytes(resource)
    except ValueError as exc:
        return _error(str(exc), command)
    except OSError as exc:  # writing the help text
        return _error(b"cannot write help: %s" % _strerror(exc), command)
    try:
        if command == b"get":
            client.get_into(resource, _FdFile(1))
        elif command == b"unset":
            client.unset(resource)
        elif len(positionals) == 2:
            client.set(resource, positionals[1])
        else:
            client.set(resource, _FdFile(0))
    except DataAPIError as exc:
        return _error(str(exc))
    except BrokenPipeError:  # stdout reader went away (`kapow get ... | head`)
        return 1
    except OSError as exc:  # our own stdin/stdout
        what = b"write output" if command == b"get" else b"read input"
        return _error(b"cannot %s: %s" % (what, _strerror(exc)), command)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
