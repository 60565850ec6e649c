"""
One control API call over pinned mutual TLS, on the standard library only.

``kapow route`` runs once per route while an init program sets a server up,
so its start-up adds to the time until the server is ready: this module uses
:mod:`ssl`, :mod:`socket` and :mod:`json` and needs neither Twisted nor
:mod:`cryptography`.  It speaks the little HTTP/1.1 a control call needs
itself: :mod:`http.client` would bring :mod:`email`, :mod:`urllib` and
:mod:`calendar` along and more than double the time this command takes to
import.  The policy is that of
:class:`kapow.client.PinnedControlPolicy`: trust exactly the pinned control
server certificate (never a default trust store, so ``SSL_CERT_FILE`` and
friends change nothing), check that it names the host or IP address of the
URL, and present the control client certificate.  Twisted programs use
:class:`kapow.client.ControlClient` instead.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl

from kapow.core.credentials import (
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
    CONTROL_ENVIRON,
    SERVER_CERT_FILE,
    CredentialsError,
    environ_pem_texts,
    read_file,
)

# typing.TYPE_CHECKING without importing typing; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

# A control call answers at once; this only bounds a server that stopped
# answering, as Twisted's connect timeout did for the Twisted client.
TIMEOUT = 30.0

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN (?:X509 )?CERTIFICATE-----.*?-----END (?:X509 )?CERTIFICATE-----", re.DOTALL
)
# OpenSSL's wrapping of its own texts: "[SSL: REASON] text (_ssl.c:1234)".
_OPENSSL_DECORATION = re.compile(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$")
# OpenSSL verification results that the pinned certificate itself can cause:
# not yet valid, expired (9, 10), host name or IP address not in it (62, 64).
# Any other one means the server presented another certificate, as the pin is
# the only certificate trusted.
_PIN_PROBLEMS = frozenset({9, 10, 62, 64})
# Alerts a server sends when it does not accept the client certificate.
_CLIENT_CERT_REFUSED = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)


class ControlError(Exception):
    """A control API call failed; ``str()`` is the server's reason (and its
    detail: ``REASON: DETAIL``) or the connection error.

    :param message: what ``str()`` gives: the line ``kapow route`` prints
        after ``kapow:``.
    :param status: the HTTP status of the answer that refused the call;
        ``None`` if there was no such answer.
    :param reason: the ``reason`` of that answer's JSON body (e.g.
        ``"Route Not Found"``); ``None`` if it carries none.
    :param detail: the ``detail`` of that JSON body, when it carries one.
    """

    def __init__(
        self, message: str, *, status: int | None = None, reason: str | None = None, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.detail = detail

    @classmethod
    def refused(cls, content: bytes, status: int) -> ControlError:
        """The error of an answer with ``status``, not the one that means success, and body ``content``.

        Its message is the JSON ``reason`` of ``content``, followed by
        ``: DETAIL`` when the body carries a ``detail`` too; ``HTTP <status>``
        when it carries no reason.
        """
        try:
            fields = json.loads(content)
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            fields = {}
        reason, detail = (
            str(value) if value else None for value in (fields.get("reason"), fields.get("detail"))
        )
        message = reason or f"HTTP {status}"
        if reason and detail:
            message += f": {detail}"
        return cls(message, status=status, reason=reason, detail=detail)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self)!r}, status={self.status!r}, "
            f"reason={self.reason!r}, detail={self.detail!r})"
        )


# -- the pinned TLS settings ----------------------------------------------------------


def pinned_context(
    server_cert_pem: bytes,
    client_cert_pem: bytes,
    client_key_pem: bytes,
    sources: tuple[str, str, str] = (
        "control server certificate",
        "control client certificate",
        "control client key",
    ),
) -> ssl.SSLContext:
    """TLS settings that trust only ``server_cert_pem`` and present the client certificate.

    Only the first certificate of each PEM text is used, as by
    :class:`kapow.client.PinnedControlPolicy`.  The host name or IP address a
    connection is made to must be in the server certificate's subjectAltName.

    :param server_cert_pem: the control server certificate, PEM.
    :param client_cert_pem: the control client certificate, PEM.
    :param client_key_pem: the unencrypted control client private key, PEM.
    :param sources: where each text came from, for error messages.
    :raises CredentialsError: naming the source of a text that holds no
        certificate or usable key, or of a key that does not match.
    """
    server_source, cert_source, key_source = sources
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The Twisted client (service_identity) ignores the subject CN; so do we.
    context.hostname_checks_common_name = False
    _load_certificate(context, server_cert_pem, server_source)
    client_cert = _first_certificate(client_cert_pem, cert_source)
    # A scratch store parses the client certificate, so that a bad one is not
    # reported as a bad key; it must never enter the store of ``context``.
    _load_certificate(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), client_cert, cert_source)

    def refuse_password() -> bytes:
        raise CredentialsError(f"{key_source}: the private key is encrypted; an unencrypted key is needed")

    # load_cert_chain reads only files; these paths never reach a disk where
    # the platform allows it.
    undo: list[Callable[[], None]] = []
    try:
        cert_path = _readable_path(client_cert, undo)
        key_path = _readable_path(client_key_pem, undo)
        context.load_cert_chain(cert_path, key_path, password=refuse_password)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise CredentialsError(
                f"the private key in {key_source} does not match the certificate in {cert_source}"
            ) from None
        raise CredentialsError(f"{key_source}: no usable PEM private key found") from None
    finally:
        for step in reversed(undo):
            step()
    return context


def context_from_environ(environ: Mapping[str, str]) -> ssl.SSLContext:
    """The pinned TLS settings from ``KAPOW_CONTROL_*`` variables.

    Reads ``KAPOW_CONTROL_SERVER_CERT``, ``KAPOW_CONTROL_CLIENT_CERT`` and
    ``KAPOW_CONTROL_CLIENT_KEY`` (PEM texts, as
    :func:`kapow.core.credentials.credentials_environ` makes them).

    :param environ: e.g. ``os.environ``.
    :raises CredentialsError: naming the variable that is missing, empty or
        unusable.
    """
    return pinned_context(*environ_pem_texts(environ), sources=CONTROL_ENVIRON)


def context_from_directory(directory: str) -> ssl.SSLContext:
    """The pinned TLS settings from a credentials directory.

    Reads ``server.crt``, ``client.crt`` and ``client.key`` (as
    :func:`kapow.core.credentials.write_client_credentials` writes them); the key
    file must not be accessible by group or others.

    :raises CredentialsError: naming the file that is missing or unusable.
    """
    paths = [os.path.join(directory, name) for name in (SERVER_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE)]
    server_cert_path, client_cert_path, client_key_path = paths
    return pinned_context(
        read_file(server_cert_path),
        read_file(client_cert_path),
        read_file(client_key_path, private=True),
        sources=(server_cert_path, client_cert_path, client_key_path),
    )


def _first_certificate(pem: bytes, source: str) -> bytes:
    match = _PEM_CERTIFICATE.search(pem)
    if match is None:
        raise CredentialsError(f"{source}: no PEM certificate found")
    return match.group()


def _load_certificate(context: ssl.SSLContext, pem: bytes, source: str) -> None:
    """Make the first certificate of ``pem`` the one ``context`` trusts."""
    try:
        context.load_verify_locations(cadata=_first_certificate(pem, source).decode("ascii", "replace"))
    except ssl.SSLError:
        raise CredentialsError(f"{source}: no PEM certificate found") from None


def _readable_path(data: bytes, undo: list[Callable[[], None]]) -> str:
    """A path OpenSSL can open to read ``data``, until the steps added to ``undo`` run.

    On Linux it names an anonymous in-memory file, so a private key never
    touches a file system; elsewhere a 0600 temporary file that ``undo``
    removes.  (A list of steps rather than a context manager keeps
    :mod:`contextlib` out of ``kapow route``.)
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("kapow-control")
        undo.append(lambda: os.close(fd))
        _write_all(fd, data)
        return f"/proc/self/fd/{fd}"
    import tempfile

    fd, path = tempfile.mkstemp(prefix="kapow-control-")
    undo.append(lambda: os.unlink(path))
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    return path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- the call -----------------------------------------------------------------------------

# What a call reads is bounded, so that a misbehaving server cannot make it
# use unbounded memory: the status line with the headers (each interim 1xx
# answer, and the trailers of a chunked body, alike), one chunk-size line, and
# the body, whose bound is far beyond any route table.
HEAD_LIMIT = 64 * 1024
CHUNK_LINE_LIMIT = 4096
BODY_LIMIT = 256 * 1024 * 1024
_RECV_SIZE = 64 * 1024

# HTTP/1.0 answers too: the request asks for the connection to close, so they
# are framed the same way.
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?: [^\r\n]*)?")
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")
# The blank line that ends a head or a trailer section (which may be empty).
_BLOCK_END = re.compile(rb"(?:^|\n)\r?\n")
_LINE_END = re.compile(rb"\r?\n")
# What urllib.parse.urlsplit strips from the start of a URL: C0 controls and space.
_URL_LEADING_JUNK = "".join(map(chr, range(0x21)))
_NETLOC_END = re.compile(r"[/?#]")
_PATH_END = re.compile(r"[?#]")
_PORT = re.compile(r"[0-9]{1,5}")
# Host and path prefix go into the request as they are: printable ASCII.
_PRINTABLE = re.compile(r"[!-~]*")


class _BadAnswer(Exception):
    """The server's answer is not HTTP/1.1 that this client reads, or is cut short."""


def call(
    context: ssl.SSLContext,
    control_url: str,
    method: str,
    path: str,
    body: object,
    expected: int,
    timeout: float = TIMEOUT,
) -> str:
    """Make one control API request and return the response body as text.

    :param context: TLS settings, e.g. from :func:`context_from_environ`.
    :param control_url: ``https://host:port``, optionally with a path prefix;
        an IPv6 address is bracketed (``https://[::1]:8081``).
    :param method: the request method, e.g. ``GET``.
    :param path: the API path, e.g. ``/routes``, percent-encoded.
    :param body: JSON-serialisable request body, or ``None``.
    :param expected: the status that means success.
    :param timeout: seconds to wait for the connection and for each read.
    :raises ControlError: with the server's reason on any other status, or
        with the connection error or what is wrong with the answer, as one line.
    """
    host, port, prefix = _target(control_url)
    payload = None if body is None else json.dumps(body).encode()
    request = _request(method, _authority(host, port), prefix + path, payload)
    try:
        status, content = _exchange(context, host, port, request, timeout)
    except (OSError, _BadAnswer) as e:
        raise ControlError(f"cannot reach control API at {control_url}: {failure_reason(e)}") from None
    if status != expected:
        raise ControlError.refused(content, status)
    return content.decode("utf-8", "replace")


# -- the URL ------------------------------------------------------------------------------


def _target(control_url: str) -> tuple[str, int, str]:
    """Host, port and path prefix of ``control_url``.

    :raises ControlError: if it is not ``https://HOST[:PORT][/PREFIX]``.
    """
    target = _split_url(control_url)
    if target is None:
        raise ControlError(
            f"cannot reach control API at {control_url}: not an https://HOST:PORT URL "
            "(the control API is HTTPS only)"
        )
    return target


def _split_url(url: str) -> tuple[str, int, str] | None:
    """``(host, port, path prefix)`` of an ``https`` URL, or ``None`` if it is not one.

    Reads the URL as :func:`urllib.parse.urlsplit` does (leading controls and
    spaces, tabs and line breaks are dropped; user information, query and
    fragment are ignored; scheme and host are case-insensitive) without
    importing :mod:`urllib`.  The host comes without brackets, in ASCII (IDNA
    for an international name), and the port defaults to 443.
    """
    url = url.lstrip(_URL_LEADING_JUNK)
    for junk in "\t\r\n":
        url = url.replace(junk, "")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "https":
        return None
    netloc = _NETLOC_END.split(rest, 1)[0]
    path = _PATH_END.split(rest[len(netloc) :], 1)[0]
    host_port = _host_and_port(netloc.rpartition("@")[2])
    if host_port is None or not _PRINTABLE.fullmatch(path):
        return None
    host, port = host_port
    return host, port, path.rstrip("/")


def _host_and_port(hostinfo: str) -> tuple[str, int] | None:
    """``host[:port]`` or ``[ipv6]:[port]`` split, or ``None`` if malformed."""
    if hostinfo.startswith("["):
        host, bracket, after = hostinfo[1:].partition("]")
        if not bracket or ":" not in host or after[:1] not in ("", ":"):
            return None
        port_text = after[1:]
    else:
        host, _, port_text = hostinfo.partition(":")
        if "[" in host or "]" in host:
            return None
    ascii_host = _ascii_host(host)
    if not ascii_host or not _PRINTABLE.fullmatch(ascii_host):
        return None
    if not port_text:
        return ascii_host, 443
    if not _PORT.fullmatch(port_text) or not 0 < int(port_text) <= 65535:
        return None
    return ascii_host, int(port_text)


def _ascii_host(host: str) -> str | None:
    """``host`` in lower case ASCII, as :mod:`ssl` and :mod:`socket` encode it (IDNA).

    ``None`` if it cannot be encoded.  A name in ASCII is checked as the
    ``idna`` codec checks it, without importing the codec (and
    :mod:`stringprep` and :mod:`unicodedata` with it): every label but the
    last is not empty, and none is longer than 63 characters.
    """
    if host.isascii():
        *labels, last = host.split(".")
        if len(last) > 63 or not all(0 < len(label) < 64 for label in labels):
            return None
        return host.lower()
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


def _authority(host: str, port: int) -> str:
    """The ``Host`` header value: bracketed IPv6 address, port unless the default."""
    authority = f"[{host}]" if ":" in host else host
    return authority if port == 443 else f"{authority}:{port}"


# -- the exchange ---------------------------------------------------------------------------


def _request(method: str, authority: str, target: str, payload: bytes | None) -> bytes:
    """The bytes of one request that asks the server to close the connection after answering."""
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {authority}",
        # No coding is decoded here, so none may be applied.
        "Accept-Encoding: identity",
        "Connection: close",
    ]
    if payload is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if payload is None else head + payload


def _exchange(
    context: ssl.SSLContext, host: str, port: int, request: bytes, timeout: float
) -> tuple[int, bytes]:
    """Send ``request`` over a new connection with ``context`` and read the answer.

    The certificate must name ``host`` (``server_hostname``).

    :returns: the status and the body of the final answer.
    :raises OSError: if the connection or TLS fails.
    :raises _BadAnswer: if the answer is malformed, too large or cut short.
    """
    # In bytes, so that neither socket nor ssl imports the idna codec to
    # encode a name that is ASCII already.
    name = host.encode("ascii")
    with socket.create_connection((name, port), timeout=timeout) as raw:  # type: ignore[arg-type]  # bytes are accepted; typeshed says str
        try:
            # A request larger than a TLS record goes out in several writes;
            # Nagle's algorithm would hold the last back until the first is
            # acknowledged.
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        with context.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(request)
            return _read_answer(_Reader(tls))


def _read_answer(reader: _Reader) -> tuple[int, bytes]:
    """Status and body of the final answer; interim (1xx) answers are skipped."""
    while True:
        status, fields = _parse_head(reader.block("the answer's head", HEAD_LIMIT))
        if status >= 200:
            break
    if status in (204, 304):
        return status, b""
    return status, _read_body(reader, fields)


def _parse_head(lines: list[bytes]) -> tuple[int, dict[str, str]]:
    """The status code and the header fields (names in lower case) of a head."""
    status_line = lines[0] if lines else b""
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise _BadAnswer(f"malformed status line {_shown(status_line)}")
    return int(match.group(1)), _parse_fields(lines[1:])


def _parse_fields(lines: list[bytes]) -> dict[str, str]:
    """Header fields by lower-case name; repeated fields are joined with ``", "``."""
    fields: dict[str, str] = {}
    name = ""
    for line in lines:
        if line[:1] in (b" ", b"\t") and name:
            # An obsolete line folding continues the previous field's value.
            fields[name] += " " + line.strip(b" \t").decode("latin-1")
            continue
        raw_name, colon, raw_value = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(raw_name):
            raise _BadAnswer(f"malformed header line {_shown(line)}")
        name = raw_name.decode("ascii").lower()
        value = raw_value.strip(b" \t").decode("latin-1")
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
    return fields


def _read_body(reader: _Reader, fields: dict[str, str]) -> bytes:
    """The body, framed by chunked coding, ``Content-Length`` or the connection's end.

    Transfer-Encoding wins over Content-Length, as RFC 9112 requires.
    """
    coding = fields.get("transfer-encoding")
    if coding is not None:
        if coding.lower() != "chunked":
            raise _BadAnswer(f"unsupported Transfer-Encoding {coding!r}")
        return _read_chunked(reader)
    length = fields.get("content-length")
    if length is not None:
        return reader.exactly(_content_length(length), "the body")
    return reader.rest()


def _content_length(text: str) -> int:
    # Repeated Content-Length fields are tolerated only if they agree.
    values = {value.strip(" \t") for value in text.split(",")}
    value = values.pop()
    if values or not value.isascii() or not value.isdigit():
        raise _BadAnswer(f"malformed Content-Length {text!r}")
    length = int(value)
    if length > BODY_LIMIT:
        raise _BadAnswer(f"the body is over {BODY_LIMIT} bytes (Content-Length: {length})")
    return length


def _read_chunked(reader: _Reader) -> bytes:
    """A chunked body: chunk extensions and trailer fields are read and ignored."""
    body = bytearray()
    while True:
        line = reader.line("a chunk size line", CHUNK_LINE_LIMIT)
        size_text = line.partition(b";")[0].strip(b" \t")
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise _BadAnswer(f"malformed chunk size line {_shown(line)}")
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > BODY_LIMIT:
            raise _BadAnswer(f"the body is over {BODY_LIMIT} bytes")
        body += reader.exactly(size, "a chunk")
        if reader.exactly(2, "a chunk") != b"\r\n":
            raise _BadAnswer("a chunk is longer than its size line says")
    reader.block("the trailer section", HEAD_LIMIT)
    return bytes(body)


def _shown(data: bytes) -> str:
    """``data`` quoted on one line, cut after 80 bytes."""
    text = repr(data[:80].decode("latin-1"))
    return text + "..." if len(data) > 80 else text


class _Reader:
    """The answer on a socket, received as it is needed.

    Every method raises :class:`_BadAnswer` if the server closes the
    connection before what it reads is complete, or if that is over its bound.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._received = 0

    def block(self, what: str, limit: int) -> list[bytes]:
        """The lines up to the next blank line, which is consumed but not returned.

        :param what: names the block in errors, e.g. ``"the answer's head"``.
        :param limit: most bytes the block may take, its blank line included.
        """
        while True:
            end = _BLOCK_END.search(self._buffer, 0, limit)
            if end is not None:
                return _LINE_END.split(self._take(end.end()))[:-2]
            if len(self._buffer) >= limit:
                raise _BadAnswer(f"{what} is over {limit} bytes")
            if not self._receive():
                if not self._received:
                    raise _BadAnswer("the server closed the connection without answering")
                raise _BadAnswer(f"the connection closed in the middle of {what}")

    def line(self, what: str, limit: int) -> bytes:
        """The next line without its line ending, which it may take ``limit`` bytes with."""
        while True:
            end = self._buffer.find(b"\n", 0, limit)
            if end >= 0:
                return _LINE_END.split(self._take(end + 1))[0]
            if len(self._buffer) >= limit:
                raise _BadAnswer(f"{what} is over {limit} bytes")
            if not self._receive():
                raise _BadAnswer(f"the connection closed in the middle of {what}")

    def exactly(self, size: int, what: str) -> bytes:
        """The next ``size`` bytes."""
        while len(self._buffer) < size:
            if not self._receive():
                raise _BadAnswer(
                    f"the connection closed in the middle of {what} ({len(self._buffer)} of {size} bytes)"
                )
        return self._take(size)

    def rest(self) -> bytes:
        """Everything until the server closes the connection, at most :data:`BODY_LIMIT` bytes."""
        while len(self._buffer) <= BODY_LIMIT:
            if not self._receive():
                return self._take(len(self._buffer))
        raise _BadAnswer(f"the body is over {BODY_LIMIT} bytes")

    def _receive(self) -> bool:
        """Receive more of the answer; ``False`` once the server has closed the connection."""
        data = self._sock.recv(_RECV_SIZE)
        self._buffer += data
        self._received += len(data)
        return bool(data)

    def _take(self, size: int) -> bytes:
        taken = bytes(self._buffer[:size])
        del self._buffer[:size]
        return taken


# -- errors -----------------------------------------------------------------------------------


def failure_reason(e: BaseException) -> str:
    """One line saying why a connection failed, naming the pin when TLS failed for it."""
    if isinstance(e, ssl.SSLCertVerificationError):
        message = e.verify_message or "certificate verify failed"
        if e.verify_code in _PIN_PROBLEMS:
            return f"TLS: {message}"
        return f"TLS: the server's certificate is not the pinned control server certificate ({message})"
    if isinstance(e, ssl.SSLError):
        text = _OPENSSL_DECORATION.sub("", str(e.strerror or e))
        if e.reason in _CLIENT_CERT_REFUSED:
            return f"TLS: the server refused the control client certificate ({text})"
        return f"TLS: {text}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join((str(e) or type(e).__name__).split())
