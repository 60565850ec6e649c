"""
One control API call over pinned mutual TLS, on the standard library only.

``kapow route`` runs once per route while an init program sets a server up,
so its start-up adds to the time until the server is ready: this module uses
:mod:`ssl` and :mod:`http.client` and needs neither Twisted nor
:mod:`cryptography`.  The policy is that of
:class:`kapow.tls.PinnedControlPolicy`: trust exactly the pinned control
server certificate (never a default trust store, so ``SSL_CERT_FILE`` and
friends change nothing), check that it names the host or IP address of the
URL, and present the control client certificate.  Twisted programs use
:func:`kapow.control_client.call` instead.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from kapow.credentials import (
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
    CONTROL_ENVIRON,
    SERVER_CERT_FILE,
    CredentialsError,
    environ_pem_texts,
    read_file,
)

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
    """The call failed; ``str()`` is the server's reason or the connection error."""


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
    :class:`kapow.tls.PinnedControlPolicy`.  The host name or IP address a
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
    with _readable_path(client_cert) as cert_path, _readable_path(client_key_pem) as key_path:
        try:
            context.load_cert_chain(cert_path, key_path, password=refuse_password)
        except ssl.SSLError as e:
            if e.reason == "KEY_VALUES_MISMATCH":
                raise CredentialsError(
                    f"the private key in {key_source} does not match the certificate in {cert_source}"
                ) from None
            raise CredentialsError(f"{key_source}: no usable PEM private key found") from None
    return context


def context_from_environ(environ: Mapping[str, str]) -> ssl.SSLContext:
    """The pinned TLS settings from ``KAPOW_CONTROL_*`` variables.

    Reads ``KAPOW_CONTROL_SERVER_CERT``, ``KAPOW_CONTROL_CLIENT_CERT`` and
    ``KAPOW_CONTROL_CLIENT_KEY`` (PEM texts, as
    :func:`kapow.credentials.credentials_environ` makes them).

    :param environ: e.g. ``os.environ``.
    :raises CredentialsError: naming the variable that is missing, empty or
        unusable.
    """
    return pinned_context(*environ_pem_texts(environ), sources=CONTROL_ENVIRON)


def context_from_directory(directory: str) -> ssl.SSLContext:
    """The pinned TLS settings from a credentials directory.

    Reads ``server.crt``, ``client.crt`` and ``client.key`` (as
    :func:`kapow.credentials.write_client_credentials` writes them); the key
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


@contextmanager
def _readable_path(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open to read ``data``, valid inside the ``with`` block.

    On Linux it names an anonymous in-memory file, so a private key never
    touches a file system; elsewhere a 0600 temporary file that is removed on
    leaving the block.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("kapow-control")
        try:
            _write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    import tempfile

    fd, path = tempfile.mkstemp(prefix="kapow-control-")
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield path
    finally:
        os.unlink(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- the call -----------------------------------------------------------------------------


def call(
    context: ssl.SSLContext,
    control_url: str,
    method: str,
    path: str,
    body: Any | None,
    expected: int,
    timeout: float = TIMEOUT,
) -> str:
    """Make one control API request and return the response body as text.

    :param context: TLS settings, e.g. from :func:`context_from_environ`.
    :param control_url: ``https://host:port``, optionally with a path prefix;
        an IPv6 address is bracketed (``https://[::1]:8081``).
    :param path: the API path, e.g. ``/routes``.
    :param body: JSON-serialisable request body, or ``None``.
    :param expected: the status that means success.
    :param timeout: seconds to wait for the connection and for each read.
    :raises ControlError: with the server's reason on any other status, or
        with the connection error, as one line.
    """
    host, port, prefix = _target(control_url)
    headers = {}
    payload = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        payload = json.dumps(body).encode()
    connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        connection.request(method, prefix + path, payload, headers)
        response = connection.getresponse()
        content = response.read()
    except (OSError, http.client.HTTPException) as e:
        raise ControlError(f"cannot reach control API at {control_url}: {_why(e)}") from None
    finally:
        connection.close()
    if response.status != expected:
        raise ControlError(_reason(content, response.status))
    return content.decode("utf-8", "replace")


def _target(control_url: str) -> tuple[str, int, str]:
    """Host, port and path prefix of ``control_url``."""
    parts = urlsplit(control_url)
    try:
        port: int | None = parts.port or 443
    except ValueError:
        port = None
    if parts.scheme != "https" or not parts.hostname or port is None:
        raise ControlError(
            f"cannot reach control API at {control_url}: not an https://HOST:PORT URL "
            "(the control API is HTTPS only)"
        )
    return parts.hostname, port, parts.path.rstrip("/")


def _reason(content: bytes, code: int) -> str:
    try:
        reason = json.loads(content)["reason"]
    except (ValueError, KeyError, TypeError):
        reason = None
    return str(reason) if reason else f"HTTP {code}"


def _why(e: Exception) -> str:
    """One line saying why a connection failed."""
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
