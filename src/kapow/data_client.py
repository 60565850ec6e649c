"""``kapow get`` / ``kapow set``: the lean client of the data API.

These two verbs run several times inside every request a handler serves, so
their start-up time is the product's latency.  This module therefore imports
only ``sys``, ``posix`` (the C module behind :mod:`os`, already loaded by the
interpreter; :mod:`os` itself costs about 1 ms more) and ``_socket`` (the C
module behind :mod:`socket`, which costs ~9 ms through :mod:`enum`), and speaks
a minimal HTTP/1.1 by hand.  Nothing from Twisted, ``http.client``, ``json`` or
``argparse`` may be imported here, directly or indirectly; a test checks it.
Nothing of the ``kapow`` package either: the handlers' launcher
(:mod:`kapow.launcher`) loads this file as the top-level module
``data_client``.

Command line::

    kapow get [--data-url URL] [--handler ID] RESOURCE
    kapow set [--data-url URL] [--handler ID] RESOURCE [VALUE]

Python API, for handlers written in Python::

    from kapow.data_client import DataClient, DataAPIError
    client = DataClient()                 # $KAPOW_DATA_URL, $KAPOW_HANDLER_ID
    name = client.get("/request/params/name")
    client.set("/response/headers/Content-Type", "text/plain")
    with open("report.txt", "rb") as f:
        client.set("/response/body", f)   # streamed in chunks

Wire protocol: ``GET``/``PUT {prefix}/handlers/{id}{resource}``; 200 is
success, anything else carries ``{"reason": "..."}``.  A value written to
``/response/body`` or ``/response/stream`` from a stream is sent as a series of
appending ``PUT`` requests of at most 64 KiB each over one keep-alive
connection, each sent only after the previous one was answered: the server
answers a chunk once the user's connection has taken it, which is the flow
control that lets an endless producer stream in bounded memory.
"""

import sys

try:
    import posix as _os
except ImportError:  # pragma: no cover - non-POSIX platforms
    import os as _os
import _socket

__all__ = ["DataAPIError", "DataClient", "is_lean_command", "main"]

DEFAULT_DATA_URL = "http://localhost:8082"
STREAMING_RESOURCES = ("/response/body", "/response/stream")
_STREAMING = (b"/response/body", b"/response/stream")
CHUNK_SIZE = 65536

_MAX_HEAD = 65536  # largest response head (status line + headers) accepted
_MAX_REASON_BODY = 65536  # error bodies are read up to this size for the reason
_MALFORMED = "malformed response from the data API"
_CLOSED_EARLY = "the data API closed the connection mid-response"
_NO_ANSWER = "the data API closed the connection without answering"
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()

USAGE = """\
usage: kapow get [--data-url URL] [--handler ID] RESOURCE
       kapow set [--data-url URL] [--handler ID] RESOURCE [VALUE]

Read a request resource, or write a response resource, of the running handler
through the Kapow! data API. `get` writes the raw value to stdout. Without
VALUE, `set` reads the value from stdin; for /response/body and
/response/stream it is streamed as it arrives.

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


class DataAPIError(Exception):
    """A data API call failed.

    ``status`` is the HTTP status of the refusal, or ``None`` when the data API
    could not be reached or broke the protocol; ``reason`` is the server's
    reason text (or a description of the failure).
    """

    def __init__(self, status, reason):
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self):
        return self.reason


class _PeerClosed(Exception):
    """The connection ended before a single byte of the response arrived."""


def _fsencode(text):
    return text.encode(_FS_ENCODING, _FS_ERRORS)


def _fsdecode(data):
    return data.decode(_FS_ENCODING, _FS_ERRORS)


def _getenv(name):
    os_module = sys.modules.get("os")
    if os_module is not None:  # honour changes made through os.environ
        return os_module.environ.get(name)
    value = _os.environ.get(_fsencode(name))  # posix.environ has bytes keys
    return None if value is None else _fsdecode(value)


def _percent_decode(text):
    data = _fsencode(text)
    if b"%" not in data:
        return text
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
    return _fsdecode(bytes(out))


def _is_hex(pair):
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def _path_bytes(text, what):
    """``text`` as request-target bytes; only what HTTP cannot carry is escaped.

    Refuses whitespace and control characters (they would end or split the
    request line).  Non-ASCII bytes and ``?``/``#`` (which would start a query
    or fragment) are percent-encoded; everything else is sent as given.
    """
    data = _fsencode(text)
    out = bytearray()
    for c in data:
        if c <= 0x20 or c == 0x7F:
            raise ValueError("invalid %s %r: whitespace or control character" % (what, text))
        if c >= 0x80 or c == 0x3F or c == 0x23:
            out += b"%%%02X" % c
        else:
            out.append(c)
    return bytes(out)


def _resource_bytes(resource):
    if not isinstance(resource, str):
        if isinstance(resource, (bytes, bytearray)):
            resource = _fsdecode(bytes(resource))
        else:
            raise TypeError("resource must be str, not %s" % type(resource).__name__)
    if not resource.startswith("/"):
        raise ValueError("invalid resource %r: it must start with '/'" % resource)
    return _path_bytes(resource, "resource")


def _parse_data_url(url):
    """-> (family, address, host header bytes, path prefix bytes)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "http+unix"):
        raise ValueError("invalid data URL %r: expected http://HOST:PORT or http+unix://SOCKET" % url)
    netloc, slash, prefix = rest.partition("/")
    prefix = (slash + prefix).rstrip("/")
    for junk in ("?", "#"):
        if junk in prefix:
            prefix = prefix.partition(junk)[0].rstrip("/")
    if not netloc or "@" in netloc:
        raise ValueError("invalid data URL %r: bad host part" % url)
    prefix_bytes = _path_bytes(prefix, "data URL path")
    if scheme == "http+unix":
        if not hasattr(_socket, "AF_UNIX"):  # pragma: no cover
            raise ValueError("unix sockets are not supported on this platform")
        return _socket.AF_UNIX, _percent_decode(netloc), b"localhost", prefix_bytes
    if netloc.startswith("["):
        host, bracket, port = netloc[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ValueError("invalid data URL %r: bad IPv6 address" % url)
        port = port[1:]
    else:
        host, _, port = netloc.partition(":")
    if not host:
        raise ValueError("invalid data URL %r: no host" % url)
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("invalid data URL %r: bad port" % url)
        port = int(port)
    else:
        port = 80
    return None, (host, port), _path_bytes(netloc, "data URL host"), prefix_bytes


class _Connection:
    """One HTTP/1.1 connection: raw requests out, parsed responses in."""

    __slots__ = ("buf", "close_after", "sock")

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.close_after = False

    def close(self):
        self.sock.close()

    def send(self, data, body):
        sock = self.sock
        if len(body) <= CHUNK_SIZE:
            sock.sendall(data + body)
        else:
            sock.sendall(data)
            sock.sendall(body)

    def _recv(self, size=CHUNK_SIZE):
        return self.sock.recv(size)

    def read_head(self):
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

    def _read_one_head(self):
        buf = self.buf
        start = 0
        while True:
            end = buf.find(b"\r\n\r\n", start)
            if end >= 0:
                break
            if len(buf) > _MAX_HEAD:
                raise DataAPIError(None, _MALFORMED)
            start = max(0, len(buf) - 3)
            try:
                data = self._recv()
            except OSError:
                if buf:  # part of an answer came: never a case for a retry
                    raise DataAPIError(None, _CLOSED_EARLY) from None
                raise
            if not data:
                if not buf:
                    raise _PeerClosed()
                raise DataAPIError(None, _CLOSED_EARLY)
            buf += data
        self.buf = buf[end + 4 :]
        lines = buf[:end].split(b"\r\n")
        parts = lines[0].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise DataAPIError(None, _MALFORMED)
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        reason = parts[2].strip() if len(parts) > 2 else b""
        return int(parts[1]), reason, headers, parts[0]

    def body(self, status, headers):
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
            data = self._recv()
            if not data:
                return
            yield data

    def _exactly(self, remaining):
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

    def _line(self):
        buf = self.buf
        start = 0
        while True:
            end = buf.find(b"\r\n", start)
            if end >= 0:
                self.buf = buf[end + 2 :]
                return buf[:end]
            if len(buf) > _MAX_HEAD:
                raise DataAPIError(None, _MALFORMED)
            start = max(0, len(buf) - 1)
            data = self._recv()
            if not data:
                raise DataAPIError(None, _CLOSED_EARLY)
            buf += data

    def _chunked(self):
        while True:
            size = self._line().partition(b";")[0].strip()
            try:
                size = int(size, 16)
            except ValueError:
                raise DataAPIError(None, _MALFORMED) from None
            if size == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                return
            yield from self._exactly(size)
            if self._line():
                raise DataAPIError(None, _MALFORMED)


def _json_reason(body):
    """The ``reason`` string of a JSON error body, or None (no json module)."""
    key = body.find(b'"reason"')
    if key < 0:
        return None
    i = key + 8
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
    out = []
    simple = {
        0x22: '"', 0x5C: "\\", 0x2F: "/", 0x62: "\b",
        0x66: "\f", 0x6E: "\n", 0x72: "\r", 0x74: "\t",
    }  # fmt: skip
    while i < n:
        end = i
        while end < n and body[end] != 0x22 and body[end] != 0x5C:
            end += 1
        out.append(body[i:end].decode("utf-8", "replace"))
        if end >= n:
            return None
        if body[end] == 0x22:
            text = "".join(out)
            # join surrogate pairs written as two \u escapes
            return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        # backslash escape
        if end + 1 >= n:
            return None
        c = body[end + 1]
        if c == 0x75:  # \uXXXX
            digits = body[end + 2 : end + 6]
            if not _is_hex(digits[:2]) or not _is_hex(digits[2:]):
                return None
            out.append(chr(int(digits, 16)))
            i = end + 6
        elif c in simple:
            out.append(simple[c])
            i = end + 2
        else:
            return None
    return None


def _one_line(text):
    return " ".join(text.split()) if ("\n" in text or "\r" in text) else text


def _reason_of(status, reason, body):
    text = _json_reason(body)
    if not text:
        text = reason.decode("utf-8", "replace") or "HTTP status %d" % status
    return _one_line(text)


class DataClient:
    """Client of the data API for one handler.

    ``data_url`` defaults to ``$KAPOW_DATA_URL``, else ``http://localhost:8082``;
    ``handler_id`` to ``$KAPOW_HANDLER_ID`` (required: ``ValueError`` without
    it).  Every call opens its own connection (a streamed ``set`` keeps one
    for all its chunks).  Failures raise :class:`DataAPIError`; a malformed
    resource raises ``ValueError``.
    """

    def __init__(self, data_url=None, handler_id=None):
        if data_url is None:
            data_url = _getenv("KAPOW_DATA_URL") or DEFAULT_DATA_URL
        if handler_id is None:
            handler_id = _getenv("KAPOW_HANDLER_ID")
        if not handler_id:
            raise ValueError("no handler id: set KAPOW_HANDLER_ID or pass --handler")
        self.data_url = data_url
        self.handler_id = handler_id
        self._family, self._address, host, prefix = _parse_data_url(data_url)
        handler = _path_bytes(handler_id, "handler id")
        if b"/" in handler:
            raise ValueError("invalid handler id %r" % handler_id)
        self._base = prefix + b"/handlers/" + handler
        self._host = host

    # -- public API -------------------------------------------------------

    def get(self, resource):
        """Return the value of ``resource`` as bytes."""
        return b"".join(self.iter_get(resource))

    def get_into(self, resource, fileobj):
        """Stream the value of ``resource`` into ``fileobj`` (anything with
        ``write(bytes)``); return the number of bytes written.  Nothing is
        written when the server refuses."""
        total = 0
        write = fileobj.write
        for chunk in self.iter_get(resource):
            write(chunk)
            total += len(chunk)
        return total

    def iter_get(self, resource):
        """Yield the value of ``resource`` in chunks; the status is checked
        (and :class:`DataAPIError` raised) before the first chunk."""
        target = self._base + _resource_bytes(resource)
        conn = self._connect()
        try:
            try:
                conn.send(self._head(b"GET", target, None, True), b"")
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

    def set(self, resource, value):
        """Write ``value`` (bytes, str, or a binary file object) to ``resource``.

        A file object written to ``/response/body`` or ``/response/stream`` is
        streamed: each chunk read from it becomes one appending PUT, sent once
        the previous one was acknowledged.  For any other resource the whole
        value is read and sent in one PUT (a header write adds one value per
        PUT, so it must be a single write)."""
        resource = _resource_bytes(resource)
        target = self._base + resource
        if isinstance(value, str):
            value = _fsencode(value)
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

    def _head(self, method, target, length, close):
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target, self._host)
        if length is not None:
            head += b"Content-Type: application/octet-stream\r\n"
            head += b"Content-Length: %d\r\n" % length
        if close:
            head += b"Connection: close\r\n"
        return head + b"\r\n"

    def _connect(self):
        family, address = self._family, self._address
        try:
            if family is not None:
                sock = _socket.socket(family, _socket.SOCK_STREAM)
                try:
                    sock.connect(address)
                except BaseException:
                    sock.close()
                    raise
                return _Connection(sock)
            host, port = address
            if host.lower() == "localhost":
                # loopback by definition (RFC 6761 6.3); spares the resolver
                # (~0.2 ms of NSS loading, a noticeable part of the budget)
                candidates = [
                    (_socket.AF_INET, ("127.0.0.1", port)),
                    (_socket.AF_INET6, ("::1", port, 0, 0)),
                ]
            else:
                try:
                    # bytes: a str host makes getaddrinfo load the idna codec,
                    # which drags in `re` (~10 ms)
                    host = host.encode("ascii")
                except UnicodeEncodeError:
                    pass
                candidates = [
                    (info[0], info[4]) for info in _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM)
                ]
            error = None
            for family, sockaddr in candidates:
                sock = _socket.socket(family, _socket.SOCK_STREAM)
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
            raise error or OSError("no address found for %s" % address[0])
        except OSError as exc:
            reason = "cannot reach data API at %s: %s" % (self.data_url, _strerror(exc))
            raise DataAPIError(None, reason) from None

    def _broken(self, exc):
        message = "connection to data API at %s failed: %s"
        return DataAPIError(None, message % (self.data_url, _strerror(exc)))

    def _refusal(self, status, reason, body):
        data = b""
        try:
            for chunk in body:
                if len(data) < _MAX_REASON_BODY:
                    data += chunk
                if len(data) >= _MAX_REASON_BODY:
                    break
        except (OSError, DataAPIError):
            pass
        return DataAPIError(status, _reason_of(status, reason, data))

    def _exchange(self, conn, target, body):
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

    def _put_all(self, target, chunks):
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

    def _put_one(self, conn, target, body):
        while True:
            fresh = conn is None
            if fresh:
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


def _read_chunks(fileobj):
    """Yield the bytes of ``fileobj`` as they become available."""
    read = getattr(fileobj, "read1", None) or fileobj.read
    while True:
        chunk = read(CHUNK_SIZE)
        if not chunk:
            return
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8")
        yield chunk


def _strerror(exc):
    if getattr(exc, "strerror", None):
        return exc.strerror
    return str(exc) or type(exc).__name__


class _FdFile:
    """Unbuffered binary file over a raw descriptor (no io/os machinery)."""

    __slots__ = ("fd",)

    def __init__(self, fd):
        self.fd = fd

    def read1(self, size):
        return _os.read(self.fd, size)

    read = read1

    def write(self, data):
        fd = self.fd
        view = memoryview(data)
        while view:
            view = view[_os.write(fd, view) :]


def _error(message):
    data = ("kapow: %s\n" % _one_line(message)).encode("utf-8", "backslashreplace")
    try:
        _os.write(2, data)
    except OSError:
        pass
    return 1


def is_lean_command(argv):
    """True when ``argv`` (like ``sys.argv``) is ``kapow get`` or ``kapow set``,
    which :func:`main` handles without importing anything heavy."""
    return len(argv) > 1 and argv[1] in ("get", "set")


def _parse_args(args, command):
    """-> (data_url, handler_id, positionals) or raises ValueError; None for help."""
    data_url = handler_id = None
    positionals = []
    separated = False
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if positionals:
            # options end at RESOURCE: a VALUE from a request ("--handler=...")
            # must never be taken for an option; one "--" may still come
            # before VALUE, as in `kapow set RESOURCE -- "$value"`
            if arg == "--" and len(positionals) == 1 and not separated:
                separated = True
            else:
                positionals.append(arg)
            continue
        if arg == "--":
            positionals.extend(args[i:])
            break
        if arg in ("-h", "--help"):
            return None
        name, eq, value = arg.partition("=")
        if name in ("--data-url", "--handler"):
            if not eq:
                if i >= len(args):
                    raise ValueError("option %s needs a value" % name)
                value = args[i]
                i += 1
            if name == "--data-url":
                data_url = value
            else:
                handler_id = value
        elif arg.startswith("-") and arg != "-":
            raise ValueError("unknown option %s (see kapow %s --help)" % (arg, command))
        else:
            positionals.append(arg)
    limit = 1 if command == "get" else 2
    if not positionals or len(positionals) > limit:
        syntax = "RESOURCE" if command == "get" else "RESOURCE [VALUE]"
        usage = "usage: kapow %s [--data-url URL] [--handler ID] %s"
        raise ValueError(usage % (command, syntax))
    return data_url, handler_id, positionals


def main(argv):
    """``kapow get`` / ``kapow set``; ``argv`` is like ``sys.argv``.  Returns
    the exit status: 0 on success, 1 on any failure (reason on stderr)."""
    if not is_lean_command(argv):
        return _error("expected 'get' or 'set'")
    command = argv[1]
    try:
        parsed = _parse_args(argv[2:], command)
        if parsed is None:
            _FdFile(1).write(USAGE.encode("utf-8"))
            return 0
        data_url, handler_id, positionals = parsed
        client = DataClient(data_url, handler_id)
        resource = positionals[0]
        _resource_bytes(resource)
    except ValueError as exc:
        return _error(str(exc))
    except OSError as exc:  # writing the help text
        return _error("cannot write help: %s" % _strerror(exc))
    try:
        if command == "get":
            client.get_into(resource, _FdFile(1))
        elif len(positionals) == 2:
            client.set(resource, positionals[1])
        else:
            client.set(resource, _FdFile(0))
    except DataAPIError as exc:
        return _error(exc.reason)
    except BrokenPipeError:  # stdout reader went away (`kapow get ... | head`)
        return 1
    except OSError as exc:  # our own stdin/stdout
        what = "write output" if command == "get" else "read input"
        return _error("cannot %s: %s" % (what, _strerror(exc)))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
