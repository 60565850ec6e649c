"""TLS for Kapow!: control-interface credentials, mutual TLS and user HTTPS.

The control interface (SPEC.md §2, "Mutual TLS with pinned, generated
certificates") is HTTPS with mutual authentication by *pinning*: the server
accepts exactly one client certificate and the client trusts exactly one server
certificate.  Both are fresh self-signed EC P-256 certificates made on every
start by :func:`generate_control_credentials`, or operator-supplied ones read by
:func:`load_control_credentials`.

- Server side: :func:`control_server_options` wrapped around any stream server
  endpoint by :func:`tls_server_endpoint`.
- Client side (``kapow route``, init programs): :class:`PinnedControlPolicy`,
  usually built by :func:`policy_from_environ` from the variables that
  :func:`credentials_environ` produces.
- Operators with curl: :func:`write_client_credentials`.

The user interface may also be served over HTTPS with operator certificates,
optionally demanding client certificates (:func:`user_server_options`); the
handler can then learn who the client is with :func:`peer_subject_dn`.

Nothing here consults the default trust stores, so ``SSL_CERT_FILE`` and
friends cannot change what the control interface trusts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
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
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IListeningPort
    from twisted.internet.protocol import Factory
    from twisted.protocols.tls import TLSMemoryBIOProtocol

__all__ = [
    "ControlCredentials",
    "CredentialsError",
    "PinnedControlPolicy",
    "control_server_options",
    "credentials_environ",
    "generate_control_credentials",
    "load_control_credentials",
    "peer_subject_dn",
    "policy_from_directory",
    "policy_from_environ",
    "reachable_host",
    "tls_server_endpoint",
    "user_server_options",
    "write_client_credentials",
    "write_full_credentials",
]

log = Logger()

SERVER_CERT_ENV = "KAPOW_CONTROL_SERVER_CERT"
CLIENT_CERT_ENV = "KAPOW_CONTROL_CLIENT_CERT"
CLIENT_KEY_ENV = "KAPOW_CONTROL_CLIENT_KEY"

SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"
CLIENT_CERT_FILE = "client.crt"
CLIENT_KEY_FILE = "client.key"

SERVER_COMMON_NAME = "control_server"
CLIENT_COMMON_NAME = "control_client"

_VALIDITY = datetime.timedelta(days=3650)
# Tolerates clocks of the client and server processes that disagree a little.
_BACKDATE = datetime.timedelta(minutes=5)

_REQUIRE_PEER_CERTIFICATE = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE

_DNS_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class ControlCredentials:
    """The four PEM texts that secure the control interface.

    The server presents ``server_cert_pem`` and accepts only a client that
    presents ``client_cert_pem``; clients trust only ``server_cert_pem``.
    ``server_key_pem`` must never leave the server process: it is not part of
    :func:`credentials_environ` nor of :func:`write_client_credentials`.
    The keys are left out of ``repr()`` so that logging the object cannot leak
    them.
    """

    server_cert_pem: bytes
    server_key_pem: bytes = field(repr=False)
    client_cert_pem: bytes
    client_key_pem: bytes = field(repr=False)


class CredentialsError(Exception):
    """Certificates or keys that cannot be used.

    ``str()`` of the exception is a single line meant for the operator: it names
    the file or variable at fault and what is wrong with it.
    """


# -- the control reachable address -------------------------------------------


def reachable_host(addr: str) -> str:
    """Return the host part of a ``host:port`` control reachable address.

    ``"localhost:8081"`` gives ``"localhost"``, ``"127.0.0.1:8081"`` gives
    ``"127.0.0.1"`` and ``"[::1]:8081"`` gives ``"::1"``.  IPv6 addresses must
    be bracketed; the brackets are removed.

    :param addr: the address clients use to reach the control interface.
    :raises ValueError: if ``addr`` is not ``host:port`` with a DNS name or IP
        address for host and a decimal port in 0-65535; the message names
        ``addr`` and the problem.
    """
    if not isinstance(addr, str) or not addr:
        raise ValueError("control reachable address is empty; expected host:port")
    if addr.startswith("["):
        close = addr.find("]")
        if close == -1:
            raise ValueError(f"control reachable address {addr!r}: missing ']'")
        host, rest = addr[1:close], addr[close + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"control reachable address {addr!r}: expected ':port' after ']'")
        port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"control reachable address {addr!r}: {host!r} in brackets is not an IPv6 address"
            ) from None
    else:
        host, sep, port = addr.rpartition(":")
        if not sep:
            raise ValueError(f"control reachable address {addr!r}: missing port; expected host:port")
        if ":" in host:
            raise ValueError(
                f"control reachable address {addr!r}: an IPv6 address must be bracketed, as in [::1]:8081"
            )
        if not host:
            raise ValueError(f"control reachable address {addr!r}: missing host")
        if not _is_ip(host) and not _DNS_NAME.fullmatch(host):
            raise ValueError(
                f"control reachable address {addr!r}: {host!r} is neither a DNS name nor an IP address"
            )
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise ValueError(f"control reachable address {addr!r}: port {port!r} is not a number from 0 to 65535")
    return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# -- generation ----------------------------------------------------------------


def generate_control_credentials(reachable_addr: str) -> ControlCredentials:
    """Make a fresh pair of self-signed control certificates with their keys.

    Both certificates carry EC P-256 keys, are signed with ECDSA-SHA256, are
    valid from five minutes ago for ten years and have a critical
    ``BasicConstraints(ca=False)`` (so nothing they sign can ever be accepted)
    and a critical ``KeyUsage(digitalSignature)``.

    - server: CN ``control_server``, extended key usage serverAuth and a
      subjectAltName holding the host of ``reachable_addr``: an IPAddress if it
      is an IPv4/IPv6 address, otherwise a DNSName.
    - client: CN ``control_client``, extended key usage clientAuth and the
      subjectAltName DNSName ``control_client``.

    :param reachable_addr: ``host:port`` by which clients reach the control
        interface (``--control-reachable-addr``), see :func:`reachable_host`.
    :raises ValueError: if ``reachable_addr`` is malformed.
    """
    host = reachable_host(reachable_addr)
    server_san: x509.GeneralName
    server_san = x509.IPAddress(ipaddress.ip_address(host)) if _is_ip(host) else x509.DNSName(host)
    server_cert, server_key = _self_signed(SERVER_COMMON_NAME, ExtendedKeyUsageOID.SERVER_AUTH, server_san)
    client_cert, client_key = _self_signed(
        CLIENT_COMMON_NAME,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        x509.DNSName(CLIENT_COMMON_NAME),
    )
    return ControlCredentials(
        server_cert_pem=server_cert,
        server_key_pem=server_key,
        client_cert_pem=client_cert,
        client_key_pem=client_key,
    )


def _self_signed(
    common_name: str, usage: x509.ObjectIdentifier, san: x509.GeneralName
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), False)
        .add_extension(x509.SubjectAlternativeName([san]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


# -- files -----------------------------------------------------------------------


def write_client_credentials(creds: ControlCredentials, directory: str) -> None:
    """Write what an operator needs to call the control API with curl.

    Writes ``server.crt`` (the pinned server certificate, for ``--cacert``),
    ``client.crt`` and ``client.key`` (for ``--cert``/``--key``); never the
    server key.  ``directory`` is created with mode 0700 if missing.  An existing
    ``directory`` must be a directory owned by this user that group and others
    cannot access (it is not chmod-ed: it might be a shared one named by
    mistake).  Each file is written to a temporary file created with mode 0600 in
    the same directory and renamed over the old one, so no reader ever sees a
    partial file or one with wider permissions.

    :raises CredentialsError: if the directory is unsuitable or a write fails.
    """
    _write_files(
        directory,
        (
            (SERVER_CERT_FILE, creds.server_cert_pem),
            (CLIENT_CERT_FILE, creds.client_cert_pem),
            (CLIENT_KEY_FILE, creds.client_key_pem),
        ),
    )


def write_full_credentials(creds: ControlCredentials, directory: str) -> None:
    """Write all four control credentials, ``server.key`` included.

    The result is a persistent set that :func:`load_control_credentials` reads
    back.  Directory and file handling are those of
    :func:`write_client_credentials`.

    :raises CredentialsError: if the directory is unsuitable or a write fails.
    """
    _write_files(
        directory,
        (
            (SERVER_CERT_FILE, creds.server_cert_pem),
            (SERVER_KEY_FILE, creds.server_key_pem),
            (CLIENT_CERT_FILE, creds.client_cert_pem),
            (CLIENT_KEY_FILE, creds.client_key_pem),
        ),
    )


def _write_files(directory: str, files: tuple[tuple[str, bytes], ...]) -> None:
    _prepare_private_directory(directory)
    for name, content in files:
        _write_private_file(os.path.join(directory, name), content)


def _prepare_private_directory(directory: str) -> None:
    try:
        os.makedirs(directory, mode=0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CredentialsError(f"cannot create credentials directory {directory}: {e.strerror}") from None
    else:
        # makedirs' mode is filtered by the umask; make it exact.
        os.chmod(directory, 0o700)
        return
    info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise CredentialsError(f"{directory} exists and is not a directory")
    if info.st_uid != os.geteuid():
        raise CredentialsError(f"credentials directory {directory} is owned by another user")
    if info.st_mode & 0o077:
        raise CredentialsError(
            f"credentials directory {directory} is accessible by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run chmod 700 {directory} "
            "or name a new directory"
        )


def _write_private_file(path: str, content: bytes) -> None:
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # The umask can only narrow 0600; this makes it exact.
            os.fchmod(fd, 0o600)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as e:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise CredentialsError(f"cannot write {path}: {e.strerror}") from None


def load_control_credentials(directory: str) -> ControlCredentials:
    """Read a persistent set of control credentials from ``directory``.

    Reads ``server.crt``, ``server.key``, ``client.crt`` and ``client.key`` (as
    written by :func:`write_full_credentials`, or made by the operator).  Each
    certificate must be a PEM certificate that is self-signed (each side trusts
    the other's certificate as its only root) and each key must be an
    unencrypted PEM private key matching its certificate.  Key files must not be
    accessible by group or others.

    :raises CredentialsError: naming the file at fault.
    """
    server_cert_path = os.path.join(directory, SERVER_CERT_FILE)
    server_key_path = os.path.join(directory, SERVER_KEY_FILE)
    client_cert_path = os.path.join(directory, CLIENT_CERT_FILE)
    client_key_path = os.path.join(directory, CLIENT_KEY_FILE)
    server_cert_pem = _read_file(server_cert_path)
    server_key_pem = _read_file(server_key_path, private=True)
    client_cert_pem = _read_file(client_cert_path)
    client_key_pem = _read_file(client_key_path, private=True)
    for cert_path, cert_pem, key_path, key_pem in (
        (server_cert_path, server_cert_pem, server_key_path, server_key_pem),
        (client_cert_path, client_cert_pem, client_key_path, client_key_pem),
    ):
        certificate = _parse_certificate(cert_pem, cert_path)
        _require_self_signed(certificate, cert_path)
        _require_match(certificate, _parse_key(key_pem, key_path), cert_path, key_path)
    return ControlCredentials(
        server_cert_pem=server_cert_pem,
        server_key_pem=server_key_pem,
        client_cert_pem=client_cert_pem,
        client_key_pem=client_key_pem,
    )


def _read_file(path: str, private: bool = False) -> bytes:
    try:
        with open(path, "rb") as f:
            if private:
                mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
                if mode & 0o077:
                    raise CredentialsError(
                        f"{path} is accessible by group or others (mode {mode:04o}); run chmod 600 {path}"
                    )
            return f.read()
    except FileNotFoundError:
        raise CredentialsError(f"{path}: no such file") from None
    except OSError as e:
        raise CredentialsError(f"cannot read {path}: {e.strerror}") from None


# -- parsing and checks ------------------------------------------------------------


def _parse_certificate(pem: bytes, source: str) -> x509.Certificate:
    return _parse_certificates(pem, source)[0]


def _parse_certificates(pem: bytes, source: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CredentialsError(f"{source}: no PEM certificate found") from None


def _parse_key(pem: bytes, source: str) -> Any:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise CredentialsError(
            f"{source}: the private key is encrypted; an unencrypted key is needed"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CredentialsError(f"{source}: no usable PEM private key found") from None


def _public_key_der(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def _require_match(certificate: x509.Certificate, key: Any, cert_source: str, key_source: str) -> None:
    if _public_key_der(key.public_key()) != _public_key_der(certificate.public_key()):
        raise CredentialsError(
            f"the private key in {key_source} does not match the certificate in {cert_source}"
        )


def _require_self_signed(certificate: x509.Certificate, source: str) -> None:
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise CredentialsError(
            f"{source}: the certificate is not self-signed; the control "
            "interface pins self-signed certificates"
        ) from None


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
    server_cert = _parse_certificate(creds.server_cert_pem, "control server certificate")
    server_key = _parse_key(creds.server_key_pem, "control server key")
    _require_match(server_cert, server_key, "control server certificate", "control server key")
    client_cert = _parse_certificate(creds.client_cert_pem, "control client certificate")
    options = CertificateOptions(
        privateKey=server_key,
        certificate=server_cert,
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


@implementer(IStreamServerEndpoint)
class _TLSServerEndpoint:
    """A stream server endpoint whose connections speak TLS."""

    def __init__(self, endpoint: IStreamServerEndpoint, options: IOpenSSLServerConnectionCreator) -> None:
        self._endpoint = endpoint
        self._options = options

    def listen(self, protocolFactory: Factory) -> Deferred[IListeningPort]:
        """Listen on the wrapped endpoint with TLS around ``protocolFactory``."""
        return self._endpoint.listen(TLSMemoryBIOFactory(self._options, False, protocolFactory))


def tls_server_endpoint(
    endpoint: IStreamServerEndpoint, options: IOpenSSLServerConnectionCreator
) -> IStreamServerEndpoint:
    """Wrap a server endpoint so that every connection it accepts is TLS.

    Works for any endpoint (TCP, UNIX, an inherited systemd socket), unlike the
    ``ssl:`` endpoint string, which cannot demand client certificates.

    :param endpoint: where to listen.
    :param options: the server TLS settings, e.g. from
        :func:`control_server_options` or :func:`user_server_options`.
    """
    return _TLSServerEndpoint(endpoint, options)


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
    chain = _parse_certificates(_read_file(certfile), certfile)
    key = _parse_key(_read_file(keyfile), keyfile)
    _require_match(chain[0], key, certfile, keyfile)
    kwargs: dict[str, Any] = {}
    if clientcafile is not None:
        authorities = _parse_certificates(_read_file(clientcafile), clientcafile)
        kwargs["trustRoot"] = trustRootFromCertificates(
            [_twisted_certificate(authority) for authority in authorities]
        )
    return CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=TLSVersion.TLSv1_2,
        **kwargs,
    )


# -- client side -------------------------------------------------------------------


@implementer(IPolicyForHTTPS)
class PinnedControlPolicy:
    """HTTPS policy for clients of the control interface.

    Connections trust exactly the pinned server certificate (never a default
    trust store), check that it names the host or IP address of the URL, and
    present the pinned client certificate.

    :param server_cert_pem: the control server certificate, PEM.
    :param client_cert_pem: the control client certificate, PEM.
    :param client_key_pem: the control client private key, PEM.
    :raises CredentialsError: if a text is not PEM or the key does not match
        the client certificate.
    """

    def __init__(self, server_cert_pem: bytes, client_cert_pem: bytes, client_key_pem: bytes) -> None:
        server_cert = _parse_certificate(server_cert_pem, "control server certificate")
        client_cert = _parse_certificate(client_cert_pem, "control client certificate")
        client_key = _parse_key(client_key_pem, "control client key")
        _require_match(client_cert, client_key, "control client certificate", "control client key")
        self._trust_root = _twisted_certificate(server_cert)
        self._client_cert = client_cert
        self._client_key = client_key

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        """Client TLS settings for a connection to ``hostname``.

        :param hostname: host of the URL (an IPv6 literal without brackets).
        :param port: port of the URL (unused: the pin does not depend on it).
        """
        # The client certificate goes in as cryptography objects: Twisted's
        # clientCertificate= hands pyOpenSSL objects to pyOpenSSL, which warns.
        return optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self._trust_root,
            extraCertificateOptions={
                "privateKey": self._client_key,
                "certificate": self._client_cert,
                "raiseMinimumTo": TLSVersion.TLSv1_2,
            },
        )


def policy_from_environ(environ: Mapping[str, str]) -> PinnedControlPolicy:
    """Build the control client policy from the environment.

    Reads ``KAPOW_CONTROL_SERVER_CERT``, ``KAPOW_CONTROL_CLIENT_CERT`` and
    ``KAPOW_CONTROL_CLIENT_KEY`` (PEM texts, as :func:`credentials_environ`
    makes them).

    :param environ: e.g. ``os.environ``.
    :raises CredentialsError: naming the variable that is missing, empty or
        unusable.
    """
    texts = {}
    for name in (SERVER_CERT_ENV, CLIENT_CERT_ENV, CLIENT_KEY_ENV):
        value = environ.get(name)
        if not value:
            raise CredentialsError(
                f"{name} is not set; it must hold the PEM text the kapow server "
                "puts in the environment of init programs"
            )
        try:
            texts[name] = value.encode("ascii")
        except UnicodeEncodeError:
            raise CredentialsError(f"{name}: not PEM text (non-ASCII)") from None
    _parse_certificate(texts[SERVER_CERT_ENV], SERVER_CERT_ENV)
    _require_match(
        _parse_certificate(texts[CLIENT_CERT_ENV], CLIENT_CERT_ENV),
        _parse_key(texts[CLIENT_KEY_ENV], CLIENT_KEY_ENV),
        CLIENT_CERT_ENV,
        CLIENT_KEY_ENV,
    )
    return PinnedControlPolicy(texts[SERVER_CERT_ENV], texts[CLIENT_CERT_ENV], texts[CLIENT_KEY_ENV])


def policy_from_directory(directory: str) -> PinnedControlPolicy:
    """Build the control client policy from a credentials directory.

    Reads the files :func:`write_client_credentials` writes (the server
    certificate, the client certificate and its key), e.g. for an operator's
    shell.

    :raises CredentialsError: naming the file that is missing or unusable.
    """
    return PinnedControlPolicy(
        _read_file(os.path.join(directory, SERVER_CERT_FILE)),
        _read_file(os.path.join(directory, CLIENT_CERT_FILE)),
        _read_file(os.path.join(directory, CLIENT_KEY_FILE), private=True),
    )


def credentials_environ(creds: ControlCredentials) -> dict[str, str]:
    """The environment variables that let a process use the control API.

    Holds the server certificate and the client certificate and key; never the
    server key.  :func:`policy_from_environ` reads them back.
    """
    return {
        SERVER_CERT_ENV: creds.server_cert_pem.decode("ascii"),
        CLIENT_CERT_ENV: creds.client_cert_pem.decode("ascii"),
        CLIENT_KEY_ENV: creds.client_key_pem.decode("ascii"),
    }


# -- peer identity -------------------------------------------------------------------


def peer_subject_dn(transport: object) -> str | None:
    """The subject DN of the client certificate on a TLS connection.

    In a twisted.web resource pass ``request.transport`` (or
    ``request.channel.transport``): with :func:`tls_server_endpoint` it is the
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
    if transport is None or not ISSLTransport.providedBy(transport):
        return None
    certificate = transport.getPeerCertificate()
    if certificate is None:
        return None
    if isinstance(certificate, X509):
        certificate = certificate.to_cryptography()
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
