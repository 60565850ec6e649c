"""A small CA, an intermediate, a server chain and a client certificate for tests."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class PKI:
    ca: Path
    server_chain: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(**attrs: str) -> x509.Name:
    oids = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME}
    return x509.Name([x509.NameAttribute(oids[k], v) for k, v in attrs.items()])


def _cert(subject, key, issuer, issuer_key, ca: bool, eku=None, san=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(directory: Path) -> PKI:
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(4)]
    ca_key, mid_key, server_key, client_key = keys
    ca_name, mid_name = _name(CN="Test Root"), _name(CN="Test Intermediate")
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    mid = _cert(mid_name, mid_key, ca_name, ca_key, ca=True)
    server = _cert(
        _name(CN="localhost"), server_key, mid_name, mid_key, ca=False,
        eku=[ExtendedKeyUsageOID.SERVER_AUTH], san=[x509.DNSName("localhost")],
    )  # fmt: skip
    client = _cert(
        _name(CN="alice", O="Example"), client_key, mid_name, mid_key, ca=False,
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )  # fmt: skip
    pki = PKI(
        ca=directory / "ca.pem",
        server_chain=directory / "server-chain.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    pki.ca.write_bytes(_pem(ca))
    pki.server_chain.write_bytes(_pem(server) + _pem(mid))
    pki.server_key.write_bytes(_key_pem(server_key))
    pki.client_cert.write_bytes(_pem(client) + _pem(mid))
    pki.client_key.write_bytes(_key_pem(client_key))
    return pki
