"""Server-side TLS for Kapow!: pinned mutual TLS on the control interface, and user HTTPS.

:func:`control_server_options` makes the control listener's settings, which
:func:`tls_server_endpoint` wraps around any stream server endpoint.  The
clients' side of the pin is :class:`kapow.client.PinnedControlPolicy`
(Twisted) and :mod:`kapow.commands.control_call` (``kapow route``).

The user interface may also be served over HTTPS with operator certificates,
optionally demanding client certificates (:func:`user_server_options`); the
handler can then learn who the client is with :func:`peer_subject_dn`. A
plain HTTP request sent to it is answered as the reference answers it
(``400 Bad Request``), not only closed.

Nothing here consults the default trust stores, so ``SSL_CERT_FILE`` and
friends cannot change what the control interface trusts.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from zope.interface import implementer

from kapow.core.credentials import (
    ControlCredentials,
    CredentialsError,
    parse_certificate,
    parse_certificates,
    parse_key,
    read_file,
    require_match,
)

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IListeningPort, IProtocolFactory
    from twisted.protocols.tls import TLSMemoryBIOProtocol

__all__ = [
    "PLAIN_HTTP_ANSWER",
    "ReloadableServerOptions",
    "control_server_options",
    "peer_subject_dn",
    "tls_server_endpoint",
    "user_server_options",
]

log = Logger()

_REQUIRE_PEER_CERTIFICATE = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE


def _twisted_certificate(certificate: x509.Certificate) -> Certificate:
    return Certificate(X509.from_cryptography(certificate))


# -- server side -------------------------------------------------------------------


def control_server_options(
    creds: ControlCredentials,
) -> IOpenSSLServerConnectionCreator:
    """TLS settings for the control listener.

    The server presents ``creds.server_cert_pem``, speaks TLS 1.2 or later and
    completes a handshake only with a client presenting exactly
    ``creds.client_cert_pem``: no certificate, another certificate, or a
    certificate issued under the pinned one all fail in the handshake.

    :raises CredentialsError: if the certificates or keys in ``creds`` are not
        usable PEM or a key does not match its certificate.
    """
    server_cert = parse_certificate(creds.server_cert_pem, "control server certificate")
    server_key = parse_key(creds.server_key_pem, "control server key")
    require_match(server_cert, server_key, "control server certificate", "control server key")
    client_cert = parse_certificate(creds.client_cert_pem, "control client certificate")
    options = CertificateOptions(
        privateKey=server_key,  # type: ignore[arg-type]  # pyOpenSSL takes cryptography keys; Twisted's hint is older
        certificate=server_cert,  # type: ignore[arg-type]  # pyOpenSSL takes cryptography certificates; Twisted's hint is older
        trustRoot=_twisted_certificate(client_cert),
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    return _PinnedClientServerOptions(options, client_cert.public_bytes(serialization.Encoding.DER))


@implementer(IOpenSSLServerConnectionCreator)
class _PinnedClientServerOptions:
    """Server connections that also demand one exact client certificate.

    The trust root alone would accept any certificate that chains to the
    pinned one; comparing the DER of the peer's leaf certificate removes that
    possibility whatever the pinned certificate's constraints are.
    """

    def __init__(self, options: CertificateOptions, pinned_der: bytes) -> None:
        self._options = options
        self._pinned_der = pinned_der

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.serverConnectionForTLS(tlsProtocol)
        connection.set_verify(_REQUIRE_PEER_CERTIFICATE, self._verify)
        return connection

    def _verify(
        self,
        connection: SSL.Connection,
        certificate: X509,
        error_number: int,
        depth: int,
        preverify_ok: int,
    ) -> bool:
        if not preverify_ok:
            return False
        if depth != 0:
            return True
        der = certificate.to_cryptography().public_bytes(serialization.Encoding.DER)
        if der == self._pinned_der:
            return True
        log.warn(
            "control connection refused: the client certificate is not the pinned one (subject {subject})",
            subject=certificate.to_cryptography().subject.rfc4514_string(),
        )
        return False


#: The first five bytes of a connection that Go's HTTPS server takes for a
#: plain HTTP request (net/http's ``tlsRecordHeaderLooksLikeHTTP``): no TLS
#: record starts with them, since a record's first byte is its type (20-23).
_PLAIN_HTTP_STARTS = frozenset({b"GET /", b"HEAD ", b"POST ", b"PUT /", b"OPTIO"})
_PLAIN_HTTP_FIRST_BYTES = frozenset(start[0] for start in _PLAIN_HTTP_STARTS)
#: The reference's answer to them, byte for byte; the connection closes after it.
PLAIN_HTTP_ANSWER = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"


class _PlainHTTPAnsweringTLS(BufferingTLSTransport):
    """
    A server TLS connection that answers a plain HTTP request sent to it
    with :data:`PLAIN_HTTP_ANSWER` and closes, instead of failing the
    handshake silently. Only a first byte that may start such a request
    holds the bytes back, until five have come.
    """

    _first: bytes | None = b""  # the bytes held while they may be plain HTTP; None once told

    def dataReceived(self, data: bytes) -> None:
        if self._first is not None:
            data = self._first + data
            if data[0] in _PLAIN_HTTP_FIRST_BYTES:
                if len(data) < 5:
                    self._first = data
                    return
                if data[:5] in _PLAIN_HTTP_STARTS:
                    self._first = None
                    assert self.transport is not None  # data came: connected
                    self.transport.write(PLAIN_HTTP_ANSWER)
                    self.transport.loseConnection()  # reads no more
                    return
            self._first = None
        super().dataReceived(data)


class _PlainHTTPAnsweringTLSFactory(TLSMemoryBIOFactory):
    protocol = _PlainHTTPAnsweringTLS


@implementer(IStreamServerEndpoint)
class _TLSServerEndpoint:
    """A stream server endpoint whose connections speak TLS."""

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        options: IOpenSSLServerConnectionCreator,
        factory: type[TLSMemoryBIOFactory],
    ) -> None:
        self._endpoint = endpoint
        self._options = options
        self._factory = factory

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen on the wrapped endpoint with TLS around ``protocolFactory``."""
        return self._endpoint.listen(self._factory(self._options, False, protocolFactory))


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerOptions:
    """
    Server TLS settings that can be loaded again (``SIGHUP``): new
    connections get the settings loaded last; a load that fails keeps the
    ones in force.

    :param load: makes the settings, raising :class:`CredentialsError` when
        a file cannot be used.
    :raises CredentialsError: when the first load fails.
    """

    def __init__(self, load: Callable[[], IOpenSSLServerConnectionCreator]) -> None:
        self._load = load
        self.current = load()

    def reload(self) -> str | None:
        """Load again; return why not, if it failed."""
        try:
            self.current = self._load()
        except CredentialsError as e:
            return str(e)
        return None

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self.current.serverConnectionForTLS(tlsProtocol)


def tls_server_endpoint(
    endpoint: IStreamServerEndpoint,
    options: IOpenSSLServerConnectionCreator,
    *,
    answer_plain_http: bool = False,
) -> IStreamServerEndpoint:
    """Wrap a server endpoint so that every connection it accepts is TLS.

    Works for any endpoint (TCP, UNIX, an inherited systemd socket), unlike the
    ``ssl:`` endpoint string, which cannot demand client certificates.

    :param endpoint: where to listen.
    :param options: the server TLS settings, e.g. from
        :func:`control_server_options` or :func:`user_server_options`.
    :param answer_plain_http: answer a connection that starts as a plain
        HTTP request as Go's HTTPS servers do, ``400 Bad Request`` with
        :data:`PLAIN_HTTP_ANSWER`, instead of only closing it.
    """
    factory = _PlainHTTPAnsweringTLSFactory if answer_plain_http else TLSMemoryBIOFactory
    return _TLSServerEndpoint(endpoint, options, factory)


def user_server_options(
    certfile: str, keyfile: str, clientcafile: str | None = None
) -> IOpenSSLServerConnectionCreator:
    """TLS settings for the user interface (``--certfile``/``--keyfile``).

    :param certfile: PEM file with the server certificate first, then any
        intermediate certificates, which are sent along with it.
    :param keyfile: PEM file with the unencrypted private key (any type
        OpenSSL supports, e.g. RSA or EC) matching the first certificate.
    :param clientcafile: optional PEM bundle of CA certificates.  When given,
        every client must present a certificate that chains to one of them;
        :func:`peer_subject_dn` then identifies the client.
    :raises CredentialsError: naming the file at fault (missing, without a
        certificate or key, encrypted key, key not matching the certificate).
    """
    chain = parse_certificates(read_file(certfile), certfile)
    key = parse_key(read_file(keyfile), keyfile)
    require_match(chain[0], key, certfile, keyfile)
    trust_root = None
    if clientcafile is not None:
        authorities = parse_certificates(read_file(clientcafile), clientcafile)
        trust_root = trustRootFromCertificates([_twisted_certificate(authority) for authority in authorities])
    return CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]  # pyOpenSSL takes cryptography keys; Twisted's hint is older
        certificate=chain[0],  # type: ignore[arg-type]  # pyOpenSSL takes cryptography certificates; Twisted's hint is older
        extraCertChain=chain[1:],  # type: ignore[arg-type]  # the same: cryptography certificates
        raiseMinimumTo=TLSVersion.TLSv1_2,
        trustRoot=trust_root,
    )


# -- peer identity -------------------------------------------------------------------


def peer_subject_dn(transport: object) -> str | None:
    """The subject DN of the client certificate on a TLS connection.

    In a twisted.web resource pass ``request.transport`` (or
    ``request.channel.transport``; over HTTP/2, where a request has no
    transport of its own, ``request.channel``, its stream): with :func:`tls_server_endpoint` it is the
    :class:`~twisted.protocols.tls.TLSMemoryBIOProtocol`, which provides
    :class:`~twisted.internet.interfaces.ISSLTransport`.  The certificate has
    been verified in the handshake when the listener demands one (the control
    interface, or :func:`user_server_options` with ``clientcafile``).

    The text is formatted exactly as Go's ``pkix.Name.String()`` formats it (as
    the reference implementation shows it): most specific first, e.g.
    ``"CN=alice,O=Example"``, the well-known attributes in Go's fixed order
    SERIALNUMBER, CN, OU, O, POSTALCODE, STREET, L, ST, C, then any other
    attribute as ``OID=#hex-of-DER``.

    :param transport: any transport, or ``None``.
    :return: the DN, or ``None`` if ``transport`` is not TLS or the peer sent
        no certificate.
    """
    connection = getattr(transport, "_conn", None)
    if connection is not None:  # a request over HTTP/2: the transport is its stream
        transport = getattr(connection, "transport", None)
    if transport is None or not ISSLTransport.providedBy(transport):
        return None
    certificate = transport.getPeerCertificate()
    if isinstance(certificate, X509):
        certificate = certificate.to_cryptography()
    if not isinstance(certificate, x509.Certificate):
        return None  # the peer sent none
    return _go_name_string(certificate.subject)


# Go's crypto/x509/pkix attributeTypeNames.
_GO_ATTRIBUTE_NAMES = MappingProxyType(
    {
        "2.5.4.6": "C",
        "2.5.4.10": "O",
        "2.5.4.11": "OU",
        "2.5.4.3": "CN",
        "2.5.4.5": "SERIALNUMBER",
        "2.5.4.7": "L",
        "2.5.4.8": "ST",
        "2.5.4.9": "STREET",
        "2.5.4.17": "POSTALCODE",
    }
)
# The attributes Go parses into named fields, in the order Name.ToRDNSequence
# emits them; each keeps every value but CN and SERIALNUMBER keep the last.
_GO_FIELDS = (
    "2.5.4.6",
    "2.5.4.8",
    "2.5.4.7",
    "2.5.4.9",
    "2.5.4.17",
    "2.5.4.10",
    "2.5.4.11",
)
_GO_SINGLE_FIELDS = ("2.5.4.3", "2.5.4.5")
_GO_PRINTABLE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'()+,-./ :=?")


def _go_name_string(name: x509.Name) -> str:
    """Format ``name`` exactly as Go's ``pkix.Name.String()`` does.

    :param name: a subject or issuer name.
    """
    parsed: dict[str, list[str]] = {}
    others: list[list[tuple[str, str | bytes]]] = []
    for attribute in name:
        oid = attribute.oid.dotted_string
        if oid in _GO_ATTRIBUTE_NAMES:
            if isinstance(attribute.value, str):
                parsed.setdefault(oid, []).append(attribute.value)
            continue
        others.append([(oid, attribute.value)])
    rdns = others
    for oid in _GO_FIELDS:
        if oid in parsed:
            rdns.append([(oid, value) for value in parsed[oid]])
    for oid in _GO_SINGLE_FIELDS:
        if parsed.get(oid, [""])[-1]:
            rdns.append([(oid, parsed[oid][-1])])
    return ",".join("+".join(_go_attribute(oid, value) for oid, value in rdn) for rdn in reversed(rdns))


def _go_attribute(oid: str, value: str | bytes) -> str:
    type_name = _GO_ATTRIBUTE_NAMES.get(oid)
    if type_name is None:
        return f"{oid}=#{_go_der(value).hex()}"
    assert isinstance(value, str)
    last = len(value) - 1
    escaped = []
    for index, char in enumerate(value):
        if char in ',+"\\<>;' or (char == " " and index in (0, last)) or (char == "#" and index == 0):
            escaped.append("\\")
        escaped.append(char)
    return f"{type_name}={''.join(escaped)}"


def _go_der(value: str | bytes) -> bytes:
    """DER of ``value`` as Go's ``asn1.Marshal`` encodes a string or bytes."""
    if isinstance(value, bytes):
        tag, body = 0x04, value
    else:
        body = value.encode("utf-8", "replace")
        tag = 0x13 if set(value) <= _GO_PRINTABLE else 0x0C
    length = len(body)
    if length < 0x80:
        header = bytes([tag, length])
    else:
        size = length.to_bytes((length.bit_length() + 7) // 8, "big")
        header = bytes([tag, 0x80 | len(size)]) + size
    return header + body
