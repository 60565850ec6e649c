"""Control-interface credentials: generation, files and checks.

The control interface (mutual TLS with pinned, generated certificates: see
the control API how-to, docs/howto/control-api.rst, and docs/security.rst)
trusts by *pinning*: the server accepts exactly one client certificate and
the client trusts exactly one server certificate. Both are fresh self-signed
EC P-256 certificates made on every start by
:func:`generate_control_credentials`, or operator-supplied ones read by
:func:`load_control_credentials`; :func:`write_client_credentials` writes what
an operator's curl needs, and with it the control API's URL, which
:func:`read_control_url` reads back for ``kapow route``.  :mod:`kapow.web.tls`
(the server), :mod:`kapow.client` (Twisted programs) and
:mod:`kapow.commands.control_call` (``kapow route``) turn them into TLS
settings.

Pure :mod:`cryptography`; nothing here imports Twisted.  The functions that
need :mod:`cryptography` import it themselves: ``kapow route`` only reads the
files and variables, and importing :mod:`cryptography` would take several
times as long as the rest of that command's start-up.  For the same reason
:mod:`datetime`, :mod:`ipaddress` and :mod:`typing` are not imported at
module level: ``kapow route`` needs none of them.
"""

from __future__ import annotations

import os
import re
import stat

# typing.TYPE_CHECKING without importing typing; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

SERVER_CERT_ENV = "KAPOW_CONTROL_SERVER_CERT"
CLIENT_CERT_ENV = "KAPOW_CONTROL_CLIENT_CERT"
CLIENT_KEY_ENV = "KAPOW_CONTROL_CLIENT_KEY"
# The variables of credentials_environ, in the order environ_pem_texts returns them.
CONTROL_ENVIRON: tuple[str, str, str] = (SERVER_CERT_ENV, CLIENT_CERT_ENV, CLIENT_KEY_ENV)

SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"
CLIENT_CERT_FILE = "client.crt"
CLIENT_KEY_FILE = "client.key"
#: The control API's URL, on one line, beside the certificates: what
#: ``kapow route`` reaches with the directory alone.
CONTROL_URL_FILE = "control_url"
#: The variable that names the control API's URL (``kapow route``, the treq client).
CONTROL_URL_ENV = "KAPOW_CONTROL_URL"
#: Where the control API is when neither a flag, the environment nor the
#: credentials directory says.
DEFAULT_CONTROL_URL = "https://localhost:8081"
#: Every file of a credentials directory.
CREDENTIALS_FILES = (SERVER_CERT_FILE, SERVER_KEY_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, CONTROL_URL_FILE)

SERVER_COMMON_NAME = "control_server"
CLIENT_COMMON_NAME = "control_client"

_VALIDITY_DAYS = 3650
# Tolerates clocks of the client and server processes that disagree a little.
_BACKDATE_MINUTES = 5

_DNS_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_PORT = re.compile(r"[0-9]{1,5}")


class ControlCredentials:
    """The four PEM texts that secure the control interface.

    The server presents ``server_cert_pem`` and accepts only a client that
    presents ``client_cert_pem``; clients trust only ``server_cert_pem``.
    ``server_key_pem`` must never leave the server process: it is not part of
    :func:`credentials_environ` nor of :func:`write_client_credentials`.
    The keys are left out of ``repr()`` so that logging the object cannot leak
    them.

    Immutable, compared and hashed by its four texts, as a frozen dataclass
    would be; a plain class keeps :mod:`dataclasses` (and :mod:`inspect`) out
    of ``kapow route``'s start-up.
    """

    __slots__ = ("client_cert_pem", "client_key_pem", "server_cert_pem", "server_key_pem")
    __match_args__ = ("server_cert_pem", "server_key_pem", "client_cert_pem", "client_key_pem")

    server_cert_pem: bytes
    server_key_pem: bytes
    client_cert_pem: bytes
    client_key_pem: bytes

    def __init__(
        self, server_cert_pem: bytes, server_key_pem: bytes, client_cert_pem: bytes, client_key_pem: bytes
    ) -> None:
        object.__setattr__(self, "server_cert_pem", server_cert_pem)
        object.__setattr__(self, "server_key_pem", server_key_pem)
        object.__setattr__(self, "client_cert_pem", client_cert_pem)
        object.__setattr__(self, "client_key_pem", client_key_pem)

    def _texts(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.server_cert_pem, self.server_key_pem, self.client_cert_pem, self.client_key_pem)

    def __repr__(self) -> str:
        return (
            f"{type(self).__qualname__}(server_cert_pem={self.server_cert_pem!r}, "
            f"client_cert_pem={self.client_cert_pem!r})"
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, ControlCredentials)
        return self._texts() == other._texts()

    def __hash__(self) -> int:
        return hash(self._texts())

    def __setattr__(self, name: str, value: object) -> None:
        from dataclasses import FrozenInstanceError

        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        from dataclasses import FrozenInstanceError

        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[type[ControlCredentials], tuple[bytes, bytes, bytes, bytes]]:
        # copy and pickle would otherwise restore the slots with setattr.
        return (type(self), self._texts())


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
        import ipaddress

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
    import ipaddress

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
    import ipaddress

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

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
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=_BACKDATE_MINUTES))
        .not_valid_after(now + datetime.timedelta(days=_VALIDITY_DAYS))
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


def write_client_credentials(
    creds: ControlCredentials, directory: str, control_url: str | None = None
) -> None:
    """Write what an operator needs to call the control API with curl.

    Writes ``server.crt`` (the pinned server certificate, for ``--cacert``),
    ``client.crt`` and ``client.key`` (for ``--cert``/``--key``); never the
    server key.  With ``control_url``, also ``control_url``: the URL that
    clients reach the control API at, on one line (:func:`read_control_url`).
    ``directory`` is created with mode 0700 if missing.  An existing
    ``directory`` must be a directory owned by this user that group and others
    cannot access (it is not chmod-ed: it might be a shared one named by
    mistake).  Each file is written to a temporary file created with mode 0600 in
    the same directory and renamed over the old one, so no reader ever sees a
    partial file or one with wider permissions.

    :raises CredentialsError: if the directory is unsuitable or a write fails.
    """
    _write_files(directory, _client_files(creds, control_url))


def write_full_credentials(creds: ControlCredentials, directory: str, control_url: str | None = None) -> None:
    """Write all four control credentials, ``server.key`` included, and ``control_url`` when given.

    The result is a persistent set that :func:`load_control_credentials` reads
    back.  Directory and file handling are those of
    :func:`write_client_credentials`.

    :raises CredentialsError: if the directory is unsuitable or a write fails.
    """
    _write_files(directory, ((SERVER_KEY_FILE, creds.server_key_pem), *_client_files(creds, control_url)))


def _client_files(creds: ControlCredentials, control_url: str | None) -> tuple[tuple[str, bytes], ...]:
    """What a client needs: the server certificate, its own certificate and key, and the URL if known."""
    files = (
        (SERVER_CERT_FILE, creds.server_cert_pem),
        (CLIENT_CERT_FILE, creds.client_cert_pem),
        (CLIENT_KEY_FILE, creds.client_key_pem),
    )
    if control_url is None:
        return files
    return (*files, (CONTROL_URL_FILE, control_url.encode("utf-8") + b"\n"))


def read_control_url(directory: str) -> str | None:
    """The control API URL that ``directory`` records, or ``None`` if it records none.

    :raises CredentialsError: if its ``control_url`` file is there but cannot be read.
    """
    path = os.path.join(directory, CONTROL_URL_FILE)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CredentialsError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CredentialsError(f"{path}: not UTF-8 text") from None
    return text.strip() or None


def existing_credentials(directory: str) -> list[str]:
    """The names of the credentials files (:data:`CREDENTIALS_FILES`) already in ``directory``."""
    return [name for name in CREDENTIALS_FILES if os.path.lexists(os.path.join(directory, name))]


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
    import secrets

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
    server_cert_pem = read_file(server_cert_path)
    server_key_pem = read_file(server_key_path, private=True)
    client_cert_pem = read_file(client_cert_path)
    client_key_pem = read_file(client_key_path, private=True)
    for cert_path, cert_pem, key_path, key_pem in (
        (server_cert_path, server_cert_pem, server_key_path, server_key_pem),
        (client_cert_path, client_cert_pem, client_key_path, client_key_pem),
    ):
        certificate = parse_certificate(cert_pem, cert_path)
        _require_self_signed(certificate, cert_path)
        require_match(certificate, parse_key(key_pem, key_path), cert_path, key_path)
    return ControlCredentials(
        server_cert_pem=server_cert_pem,
        server_key_pem=server_key_pem,
        client_cert_pem=client_cert_pem,
        client_key_pem=client_key_pem,
    )


def read_file(path: str, private: bool = False) -> bytes:
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


def credentials_environ(creds: ControlCredentials) -> dict[str, str]:
    """The environment variables that let a process use the control API.

    Holds the server certificate and the client certificate and key; never the
    server key.  :func:`environ_pem_texts` reads them back.
    """
    return {
        SERVER_CERT_ENV: creds.server_cert_pem.decode("ascii"),
        CLIENT_CERT_ENV: creds.client_cert_pem.decode("ascii"),
        CLIENT_KEY_ENV: creds.client_key_pem.decode("ascii"),
    }


def environ_pem_texts(environ: Mapping[str, str]) -> tuple[bytes, bytes, bytes]:
    """The PEM texts of the ``KAPOW_CONTROL_*`` variables.

    Returns the values of ``KAPOW_CONTROL_SERVER_CERT``,
    ``KAPOW_CONTROL_CLIENT_CERT`` and ``KAPOW_CONTROL_CLIENT_KEY`` (the order
    of :data:`CONTROL_ENVIRON`), as :func:`credentials_environ` makes them,
    without parsing them: :func:`kapow.commands.control_call.context_from_environ` and
    :func:`kapow.client.policy_from_environ` do.

    :param environ: e.g. ``os.environ``.
    :raises CredentialsError: naming the variable that is missing, empty or
        not ASCII.
    """
    texts = []
    for name in CONTROL_ENVIRON:
        value = environ.get(name)
        if not value:
            raise CredentialsError(
                f"{name} is not set; it must hold the PEM text the kapow server "
                "puts in the environment of init programs"
            )
        try:
            texts.append(value.encode("ascii"))
        except UnicodeEncodeError:
            raise CredentialsError(f"{name}: not PEM text (non-ASCII)") from None
    server_cert_pem, client_cert_pem, client_key_pem = texts
    return server_cert_pem, client_cert_pem, client_key_pem


# -- parsing and checks ------------------------------------------------------------


def parse_certificate(pem: bytes, source: str) -> x509.Certificate:
    return parse_certificates(pem, source)[0]


def parse_certificates(pem: bytes, source: str) -> list[x509.Certificate]:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CredentialsError(f"{source}: no PEM certificate found") from None


def parse_key(pem: bytes, source: str) -> PrivateKeyTypes:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise CredentialsError(
            f"{source}: the private key is encrypted; an unencrypted key is needed"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CredentialsError(f"{source}: no usable PEM private key found") from None


def _public_key_der(key: PublicKeyTypes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def require_match(
    certificate: x509.Certificate, key: PrivateKeyTypes, cert_source: str, key_source: str
) -> None:
    if _public_key_der(key.public_key()) != _public_key_der(certificate.public_key()):
        raise CredentialsError(
            f"the private key in {key_source} does not match the certificate in {cert_source}"
        )


def _require_self_signed(certificate: x509.Certificate, source: str) -> None:
    from cryptography.exceptions import InvalidSignature

    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise CredentialsError(
            f"{source}: the certificate is not self-signed; the control "
            "interface pins self-signed certificates"
        ) from None
