"""Tests for kapow.web.tls and the pinned policy of kapow.client: certificates, pinned mutual TLS over loopback, curl."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import stat
import tempfile

import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL.crypto import X509
from twisted.internet import reactor
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
)
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from kapow import client as control_client
from kapow.core import credentials
from kapow.core.credentials import ControlCredentials, CredentialsError
from kapow.web import tls

# -- certificate helpers --------------------------------------------------------


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def _issue(
    subject: x509.Name,
    key,
    issuer: x509.Name | None = None,
    issuer_key=None,
    *,
    ca: bool = False,
    san: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    """A certificate for ``key``; self-signed unless an issuer is given."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _tmpdir(case: TestCase) -> str:
    """A fresh private directory removed after the test."""
    path = tempfile.mkdtemp(prefix="kapow-test-tls-")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def _ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pinned_ca_credentials() -> tuple[ControlCredentials, x509.Certificate, object]:
    """Credentials whose pinned client certificate may sign, and a leaf it signed.

    Chain verification alone accepts that leaf; only the exact pin refuses it.
    """
    creds = credentials.generate_control_credentials("127.0.0.1:1")
    ca_key = _ec_key()
    ca_name = _name((NameOID.COMMON_NAME, "control_client"))
    ca_cert = _issue(ca_name, ca_key, ca=True, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    leaf_key = _ec_key()
    leaf = _issue(
        _name((NameOID.COMMON_NAME, "impostor")),
        leaf_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    creds = ControlCredentials(
        server_cert_pem=creds.server_cert_pem,
        server_key_pem=creds.server_key_pem,
        client_cert_pem=_pem(ca_cert),
        client_key_pem=_pem(ca_key),
    )
    return creds, leaf, leaf_key


# -- loopback helpers -----------------------------------------------------------


class _Ok(Resource):
    """Answers ``ok`` and records the peer DN seen through the request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.renders = 0
        self.peer_dns: list[tuple[str | None, str | None]] = []

    def render_GET(self, request) -> bytes:
        self.renders += 1
        self.peer_dns.append(
            (
                tls.peer_subject_dn(request.transport),
                tls.peer_subject_dn(request.channel.transport),
            )
        )
        return b"ok"


@implementer(IPolicyForHTTPS)
class _Policy:
    """A client policy with explicit trust and an optional client certificate."""

    def __init__(self, trust_pem: bytes, cert_pem: bytes | None = None, key=None):
        self._trust = Certificate.loadPEM(trust_pem)
        self._extra = {}
        if cert_pem is not None:
            self._extra = {
                "certificate": _cert(cert_pem),
                "privateKey": serialization.load_pem_private_key(key, None)
                if isinstance(key, bytes)
                else key,
            }

    def creatorForNetloc(self, hostname: bytes, port: int):
        return optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self._trust,
            extraCertificateOptions=dict(self._extra),
        )


def _pinned(creds: ControlCredentials) -> control_client.PinnedControlPolicy:
    return control_client.PinnedControlPolicy(
        creds.server_cert_pem, creds.client_cert_pem, creds.client_key_pem
    )


class _Loopback(TestCase):
    """Real TLS servers on loopback, removed after each test."""

    async def serve(self, options, ipv6: bool = False) -> tuple[int, _Ok]:
        resource = _Ok()
        if ipv6:
            endpoint = TCP6ServerEndpoint(reactor, 0, interface="::1")
        else:
            endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await tls.tls_server_endpoint(endpoint, options).listen(Site(resource))
        self.addCleanup(port.stopListening)
        return port.getHost().port, resource

    async def get(self, policy, url: str) -> bytes:
        agent = Agent(reactor, contextFactory=policy)
        response = await agent.request(b"GET", url.encode("ascii"))
        self.assertEqual(response.code, 200)
        return await treq.content(response)

    async def assert_refused(self, policy, url: str, resource: _Ok) -> None:
        before = resource.renders
        with self.assertRaises(Exception) as caught:
            await self.get(policy, url)
        self.assertNotIsInstance(caught.exception, self.failureException)
        self.assertEqual(resource.renders, before, "the request reached the resource")


# -- tests ------------------------------------------------------------------------


class ReachableHostTests(TestCase):
    def test_hosts(self) -> None:
        for addr, host in [
            ("localhost:8081", "localhost"),
            ("127.0.0.1:8081", "127.0.0.1"),
            ("[::1]:8081", "::1"),
            ("[2600::]:8081", "2600::"),
            ("example.com:9", "example.com"),
            ("kapow-control.internal:0", "kapow-control.internal"),
        ]:
            self.assertEqual(credentials.reachable_host(addr), host, addr)

    def test_bad(self) -> None:
        for addr in [
            "",
            "noport",
            "[::1",
            "host:notaport",
            "host:",
            ":8081",
            "host:65536",
            "host:-1",
            "::1:8081",
            "[::1]8081",
            "[::1]:",
            "[example.com]:8081",
            "exa mple:80",
        ]:
            with self.assertRaises(ValueError, msg=addr) as caught:
                credentials.reachable_host(addr)
            message = str(caught.exception)
            self.assertNotIn("\n", message)
            if addr:
                self.assertIn(repr(addr), message)


class GenerateTests(TestCase):
    def test_server_san(self) -> None:
        for addr, expected in [
            ("localhost:8081", x509.DNSName("localhost")),
            ("127.0.0.1:8081", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
            ("[::1]:8081", x509.IPAddress(ipaddress.ip_address("::1"))),
            ("[2600::]:8081", x509.IPAddress(ipaddress.ip_address("2600::"))),
            ("example.test:8081", x509.DNSName("example.test")),
        ]:
            creds = credentials.generate_control_credentials(addr)
            san = _cert(creds.server_cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
            self.assertEqual(list(san.value), [expected], addr)

    def test_bad_address(self) -> None:
        self.assertRaises(ValueError, credentials.generate_control_credentials, "noport")

    def _check(self, cert_pem, key_pem, common_name, usage, san) -> None:
        cert = _cert(cert_pem)
        self.assertEqual(cert.subject, _name((NameOID.COMMON_NAME, common_name)))
        self.assertEqual(cert.issuer, cert.subject)
        cert.verify_directly_issued_by(cert)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertFalse(constraints.value.ca)
        key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(key_usage.digital_signature)
        self.assertFalse(key_usage.key_cert_sign)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        self.assertEqual(list(eku.value), [usage])
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(list(alt.value), [san])
        public = cert.public_key()
        self.assertIsInstance(public, ec.EllipticCurvePublicKey)
        self.assertIsInstance(public.curve, ec.SECP256R1)
        key = serialization.load_pem_private_key(key_pem, None)
        self.assertEqual(key.public_key(), public)
        now = datetime.datetime.now(datetime.UTC)
        self.assertLessEqual(cert.not_valid_before_utc, now - datetime.timedelta(minutes=4))
        self.assertGreaterEqual(cert.not_valid_after_utc, now + datetime.timedelta(days=9 * 365))

    def test_server_certificate(self) -> None:
        creds = credentials.generate_control_credentials("localhost:8081")
        self._check(
            creds.server_cert_pem,
            creds.server_key_pem,
            "control_server",
            ExtendedKeyUsageOID.SERVER_AUTH,
            x509.DNSName("localhost"),
        )

    def test_client_certificate(self) -> None:
        creds = credentials.generate_control_credentials("localhost:8081")
        self._check(
            creds.client_cert_pem,
            creds.client_key_pem,
            "control_client",
            ExtendedKeyUsageOID.CLIENT_AUTH,
            x509.DNSName("control_client"),
        )

    def test_fresh_each_time(self) -> None:
        first = credentials.generate_control_credentials("localhost:8081")
        second = credentials.generate_control_credentials("localhost:8081")
        for name in ("server_cert_pem", "server_key_pem", "client_cert_pem"):
            self.assertNotEqual(getattr(first, name), getattr(second, name))

    def test_repr_hides_keys(self) -> None:
        creds = credentials.generate_control_credentials("localhost:8081")
        text = repr(creds)
        self.assertNotIn("PRIVATE KEY", text)
        self.assertIn("CERTIFICATE", text)


class EnvironTests(TestCase):
    def test_environ_carries_no_server_key(self) -> None:
        creds = credentials.generate_control_credentials("localhost:8081")
        env = credentials.credentials_environ(creds)
        self.assertEqual(
            env,
            {
                "KAPOW_CONTROL_SERVER_CERT": creds.server_cert_pem.decode(),
                "KAPOW_CONTROL_CLIENT_CERT": creds.client_cert_pem.decode(),
                "KAPOW_CONTROL_CLIENT_KEY": creds.client_key_pem.decode(),
            },
        )
        self.assertNotIn(creds.server_key_pem.decode(), "".join(env.values()))
        self.assertIsInstance(control_client.policy_from_environ(env), control_client.PinnedControlPolicy)

    def test_missing_variable(self) -> None:
        env = credentials.credentials_environ(credentials.generate_control_credentials("localhost:1"))
        for name in env:
            for broken in (
                {k: v for k, v in env.items() if k != name},
                {**env, name: ""},
                {**env, name: "garbage"},
            ):
                with self.assertRaises(CredentialsError) as caught:
                    control_client.policy_from_environ(broken)
                self.assertIn(name, str(caught.exception))
                self.assertNotIn("\n", str(caught.exception))

    def test_mismatched_client_key(self) -> None:
        env = credentials.credentials_environ(credentials.generate_control_credentials("localhost:1"))
        other = credentials.credentials_environ(credentials.generate_control_credentials("localhost:1"))
        env["KAPOW_CONTROL_CLIENT_KEY"] = other["KAPOW_CONTROL_CLIENT_KEY"]
        with self.assertRaises(CredentialsError) as caught:
            control_client.policy_from_environ(env)
        self.assertIn("KAPOW_CONTROL_CLIENT_KEY", str(caught.exception))
        self.assertIn("does not match", str(caught.exception))


class ControlAcceptanceTests(_Loopback):
    async def test_localhost(self) -> None:
        creds = credentials.generate_control_credentials("localhost:8081")
        port, resource = await self.serve(tls.control_server_options(creds))
        body = await self.get(_pinned(creds), f"https://localhost:{port}/")
        self.assertEqual(body, b"ok")
        self.assertEqual(resource.peer_dns, [("CN=control_client",) * 2])

    async def test_ipv4(self) -> None:
        creds = credentials.generate_control_credentials("127.0.0.1:8081")
        port, _ = await self.serve(tls.control_server_options(creds))
        body = await self.get(_pinned(creds), f"https://127.0.0.1:{port}/")
        self.assertEqual(body, b"ok")

    async def test_ipv6(self) -> None:
        creds = credentials.generate_control_credentials("[::1]:8081")
        port, _ = await self.serve(tls.control_server_options(creds), ipv6=True)
        body = await self.get(_pinned(creds), f"https://[::1]:{port}/")
        self.assertEqual(body, b"ok")

    async def test_dns_name_other_than_localhost(self) -> None:
        """A DNSName SAN matches the URL host (resolved here to loopback)."""
        creds = credentials.generate_control_credentials("example.test:8081")
        port, _ = await self.serve(tls.control_server_options(creds))
        policy = _pinned(creds)

        class ToLoopback:
            def endpointForURI(self, uri):
                return wrapClientTLS(
                    policy.creatorForNetloc(uri.host, uri.port),
                    TCP4ClientEndpoint(reactor, "127.0.0.1", uri.port),
                )

        agent = Agent.usingEndpointFactory(reactor, ToLoopback())
        response = await agent.request(b"GET", f"https://example.test:{port}/".encode())
        self.assertEqual(await treq.content(response), b"ok")


class ControlRefusalTests(_Loopback):
    async def test_no_client_certificate(self) -> None:
        creds = credentials.generate_control_credentials("127.0.0.1:8081")
        port, resource = await self.serve(tls.control_server_options(creds))
        url = f"https://127.0.0.1:{port}/"
        self.assertEqual(await self.get(_pinned(creds), url), b"ok")
        await self.assert_refused(_Policy(creds.server_cert_pem), url, resource)

    async def test_foreign_client_certificate(self) -> None:
        creds = credentials.generate_control_credentials("127.0.0.1:8081")
        other = credentials.generate_control_credentials("127.0.0.1:8081")
        port, resource = await self.serve(tls.control_server_options(creds))
        url = f"https://127.0.0.1:{port}/"
        self.assertEqual(await self.get(_pinned(creds), url), b"ok")
        foreign = control_client.PinnedControlPolicy(
            creds.server_cert_pem, other.client_cert_pem, other.client_key_pem
        )
        await self.assert_refused(foreign, url, resource)

    async def test_certificate_signed_by_pinned_key(self) -> None:
        creds = credentials.generate_control_credentials("127.0.0.1:8081")
        pinned = _cert(creds.client_cert_pem)
        pinned_key = serialization.load_pem_private_key(creds.client_key_pem, None)
        leaf_key = _ec_key()
        leaf = _issue(
            _name((NameOID.COMMON_NAME, "impostor")),
            leaf_key,
            pinned.subject,
            pinned_key,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        port, resource = await self.serve(tls.control_server_options(creds))
        url = f"https://127.0.0.1:{port}/"
        policy = _Policy(creds.server_cert_pem, _pem(leaf), leaf_key)
        await self.assert_refused(policy, url, resource)

    async def test_pin_refuses_what_the_chain_accepts(self) -> None:
        creds, leaf, leaf_key = _pinned_ca_credentials()
        impostor = _Policy(creds.server_cert_pem, _pem(leaf), leaf_key)
        # Control: a trust root alone accepts the leaf the pinned key signed.
        chain_only = CertificateOptions(
            privateKey=serialization.load_pem_private_key(creds.server_key_pem, None),
            certificate=_cert(creds.server_cert_pem),
            trustRoot=Certificate.loadPEM(creds.client_cert_pem),
        )
        port, _ = await self.serve(chain_only)
        self.assertEqual(await self.get(impostor, f"https://127.0.0.1:{port}/"), b"ok")
        port, resource = await self.serve(tls.control_server_options(creds))
        url = f"https://127.0.0.1:{port}/"
        self.assertEqual(await self.get(_pinned(creds), url), b"ok")
        await self.assert_refused(impostor, url, resource)

    async def test_foreign_server_certificate(self) -> None:
        pinned = credentials.generate_control_credentials("127.0.0.1:8081")
        actual = credentials.generate_control_credentials("127.0.0.1:8081")
        port, resource = await self.serve(tls.control_server_options(actual))
        url = f"https://127.0.0.1:{port}/"
        self.assertEqual(await self.get(_pinned(actual), url), b"ok")
        await self.assert_refused(_pinned(pinned), url, resource)

    async def test_host_mismatch(self) -> None:
        creds = credentials.generate_control_credentials("example.test:8081")
        port, resource = await self.serve(tls.control_server_options(creds))
        await self.assert_refused(_pinned(creds), f"https://127.0.0.1:{port}/", resource)

    async def test_ip_mismatch(self) -> None:
        creds = credentials.generate_control_credentials("127.0.0.2:8081")
        port, resource = await self.serve(tls.control_server_options(creds))
        await self.assert_refused(_pinned(creds), f"https://127.0.0.1:{port}/", resource)

    def test_bad_credentials(self) -> None:
        creds = credentials.generate_control_credentials("localhost:8081")
        other = credentials.generate_control_credentials("localhost:8081")
        for broken in (
            ControlCredentials(
                b"junk",
                creds.server_key_pem,
                creds.client_cert_pem,
                creds.client_key_pem,
            ),
            ControlCredentials(
                creds.server_cert_pem,
                other.server_key_pem,
                creds.client_cert_pem,
                creds.client_key_pem,
            ),
        ):
            self.assertRaises(CredentialsError, tls.control_server_options, broken)


class CurlTests(_Loopback):
    def setUp(self) -> None:
        if shutil.which("curl") is None:
            self.skipTest("curl is not installed")

    async def curl(self, *args: str) -> tuple[bytes, bytes, int]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")
        }
        return await getProcessOutputAndValue("curl", ("-sS", "--max-time", "10", *args), env=env)

    async def test_curl_with_written_credentials(self) -> None:
        creds = credentials.generate_control_credentials("localhost:8081")
        directory = os.path.join(_tmpdir(self), "control")
        old_umask = os.umask(0)
        try:
            credentials.write_client_credentials(creds, directory)
        finally:
            os.umask(old_umask)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        self.assertEqual(sorted(os.listdir(directory)), ["client.crt", "client.key", "server.crt"])
        for name in os.listdir(directory):
            mode = os.stat(os.path.join(directory, name)).st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o600, name)

        port, _ = await self.serve(tls.control_server_options(creds))
        url = f"https://localhost:{port}/"
        cacert = ("--cacert", os.path.join(directory, "server.crt"))
        out, err, code = await self.curl(
            "--cert",
            os.path.join(directory, "client.crt"),
            "--key",
            os.path.join(directory, "client.key"),
            *cacert,
            url,
        )
        self.assertEqual((out, code), (b"ok", 0), err)

        out, err, code = await self.curl(*cacert, url)
        self.assertNotEqual(code, 0)
        self.assertEqual(out, b"")


class FilesTests(TestCase):
    def test_full_round_trip(self) -> None:
        creds = credentials.generate_control_credentials("localhost:8081")
        directory = os.path.join(_tmpdir(self), "creds")
        credentials.write_full_credentials(creds, directory)
        self.assertEqual(
            sorted(os.listdir(directory)),
            ["client.crt", "client.key", "server.crt", "server.key"],
        )
        self.assertEqual(
            stat.S_IMODE(os.stat(os.path.join(directory, "server.key")).st_mode),
            0o600,
        )
        self.assertEqual(credentials.load_control_credentials(directory), creds)

    def test_rewrite_replaces(self) -> None:
        directory = os.path.join(_tmpdir(self), "creds")
        credentials.write_full_credentials(credentials.generate_control_credentials("localhost:1"), directory)
        creds = credentials.generate_control_credentials("localhost:1")
        credentials.write_full_credentials(creds, directory)
        self.assertEqual(credentials.load_control_credentials(directory), creds)
        self.assertEqual(len(os.listdir(directory)), 4)

    def test_existing_open_directory_refused(self) -> None:
        directory = os.path.join(_tmpdir(self), "open")
        os.mkdir(directory)
        os.chmod(directory, 0o755)
        creds = credentials.generate_control_credentials("localhost:1")
        with self.assertRaises(CredentialsError) as caught:
            credentials.write_client_credentials(creds, directory)
        self.assertIn(directory, str(caught.exception))
        self.assertEqual(os.listdir(directory), [])
        os.chmod(directory, 0o700)
        credentials.write_client_credentials(creds, directory)

    def test_existing_file_refused(self) -> None:
        path = os.path.join(_tmpdir(self), "file")
        with open(path, "w"):
            pass
        creds = credentials.generate_control_credentials("localhost:1")
        with self.assertRaises(CredentialsError) as caught:
            credentials.write_client_credentials(creds, path)
        self.assertIn("not a directory", str(caught.exception))

    def _written(self) -> str:
        directory = os.path.join(_tmpdir(self), "creds")
        credentials.write_full_credentials(credentials.generate_control_credentials("localhost:1"), directory)
        return directory

    def _assert_load_fails(self, directory: str, name: str) -> str:
        with self.assertRaises(CredentialsError) as caught:
            credentials.load_control_credentials(directory)
        message = str(caught.exception)
        self.assertIn(os.path.join(directory, name), message)
        self.assertNotIn("\n", message)
        return message

    def test_load_missing_file(self) -> None:
        directory = self._written()
        os.unlink(os.path.join(directory, "client.crt"))
        self._assert_load_fails(directory, "client.crt")

    def test_load_garbage(self) -> None:
        directory = self._written()
        with open(os.path.join(directory, "server.crt"), "wb") as f:
            f.write(b"not a certificate\n")
        self._assert_load_fails(directory, "server.crt")

    def test_load_mismatched_key(self) -> None:
        directory = self._written()
        other = credentials.generate_control_credentials("localhost:1")
        path = os.path.join(directory, "client.key")
        with open(path, "wb") as f:
            f.write(other.client_key_pem)
        message = self._assert_load_fails(directory, "client.key")
        self.assertIn("does not match", message)

    def test_load_key_readable_by_others(self) -> None:
        directory = self._written()
        os.chmod(os.path.join(directory, "server.key"), 0o644)
        message = self._assert_load_fails(directory, "server.key")
        self.assertIn("0644", message)

    def test_load_not_self_signed(self) -> None:
        directory = self._written()
        ca_key, key = _ec_key(), _ec_key()
        ca_name = _name((NameOID.COMMON_NAME, "some CA"))
        cert = _issue(_name((NameOID.COMMON_NAME, "s")), key, ca_name, ca_key)
        for name, data in (("server.crt", _pem(cert)), ("server.key", _pem(key))):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        self.assertIn("self-signed", self._assert_load_fails(directory, "server.crt"))


class UserServerTests(_Loopback):
    def setUp(self) -> None:
        root_key, intermediate_key = _ec_key(), _ec_key()
        self.root_name = _name((NameOID.COMMON_NAME, "Test Root"))
        intermediate_name = _name((NameOID.COMMON_NAME, "Test Intermediate"))
        self.root = _issue(self.root_name, root_key, ca=True)
        self.root_key = root_key
        intermediate = _issue(intermediate_name, intermediate_key, self.root_name, root_key, ca=True)
        self.leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.leaf = _issue(
            _name((NameOID.COMMON_NAME, "localhost")),
            self.leaf_key,
            intermediate_name,
            intermediate_key,
            san=[x509.DNSName("localhost")],
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
        )
        self.dir = _tmpdir(self)
        self.certfile = self.write("chain.pem", _pem(self.leaf) + _pem(intermediate))
        self.leafonly = self.write("leaf.pem", _pem(self.leaf))
        self.keyfile = self.write("key.pem", _pem(self.leaf_key))

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    async def test_chain_is_presented(self) -> None:
        client = _Policy(_pem(self.root))
        port, resource = await self.serve(tls.user_server_options(self.certfile, self.keyfile))
        url = f"https://localhost:{port}/"
        self.assertEqual(await self.get(client, url), b"ok")
        self.assertEqual(resource.peer_dns, [(None, None)])
        # Without the intermediate in certfile the same client cannot verify.
        port, resource = await self.serve(tls.user_server_options(self.leafonly, self.keyfile))
        await self.assert_refused(client, f"https://localhost:{port}/", resource)

    async def test_client_certificates_required(self) -> None:
        client_ca_key, other_ca_key = _ec_key(), _ec_key()
        client_ca_name = _name((NameOID.COMMON_NAME, "Client CA"))
        client_ca = _issue(client_ca_name, client_ca_key, ca=True)
        other_ca = _issue(_name((NameOID.COMMON_NAME, "Other")), other_ca_key, ca=True)
        bundle = self.write("clients.pem", _pem(other_ca) + _pem(client_ca))
        alice_key = _ec_key()
        alice = _issue(
            _name((NameOID.ORGANIZATION_NAME, "Example"), (NameOID.COMMON_NAME, "alice")),
            alice_key,
            client_ca_name,
            client_ca_key,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        mallory_key = _ec_key()
        mallory = _issue(
            _name((NameOID.COMMON_NAME, "mallory")),
            mallory_key,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        port, resource = await self.serve(tls.user_server_options(self.certfile, self.keyfile, bundle))
        url = f"https://localhost:{port}/"
        root = _pem(self.root)
        self.assertEqual(await self.get(_Policy(root, _pem(alice), alice_key), url), b"ok")
        self.assertEqual(resource.peer_dns, [("CN=alice,O=Example",) * 2])
        await self.assert_refused(_Policy(root), url, resource)
        await self.assert_refused(_Policy(root, _pem(mallory), mallory_key), url, resource)

    def test_errors(self) -> None:
        missing = os.path.join(self.dir, "missing.pem")
        other_key = self.write("other.key", _pem(_ec_key()))
        encrypted = self.write(
            "encrypted.key",
            self.leaf_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
        )
        for args, culprit in [
            ((missing, self.keyfile), missing),
            ((self.keyfile, self.keyfile), self.keyfile),
            ((self.certfile, missing), missing),
            ((self.certfile, self.certfile), self.certfile),
            ((self.certfile, other_key), other_key),
            ((self.certfile, encrypted), encrypted),
            ((self.certfile, self.keyfile, missing), missing),
            ((self.certfile, self.keyfile, self.keyfile), self.keyfile),
        ]:
            with self.assertRaises(CredentialsError, msg=args) as caught:
                tls.user_server_options(*args)
            self.assertIn(culprit, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_combined_key_and_certificate_file(self) -> None:
        both = self.write("both.pem", _pem(self.leaf) + _pem(self.leaf_key))
        tls.user_server_options(both, both)


@implementer(ISSLTransport)
class _FakeTLSTransport(StringTransport):
    def __init__(self, certificate) -> None:
        super().__init__()
        self._certificate = certificate

    def getPeerCertificate(self):
        return self._certificate


class PeerSubjectDNTests(TestCase):
    def dn(self, *attributes: tuple[x509.ObjectIdentifier, str]) -> str | None:
        key = _ec_key()
        cert = _issue(_name(*attributes), key)
        return tls.peer_subject_dn(_FakeTLSTransport(X509.from_cryptography(cert)))

    def test_no_tls(self) -> None:
        self.assertIsNone(tls.peer_subject_dn(None))
        self.assertIsNone(tls.peer_subject_dn(StringTransport()))
        self.assertIsNone(tls.peer_subject_dn(_FakeTLSTransport(None)))

    def test_most_specific_first(self) -> None:
        self.assertEqual(
            self.dn(
                (NameOID.COUNTRY_NAME, "ES"),
                (NameOID.ORGANIZATION_NAME, "Example"),
                (NameOID.COMMON_NAME, "alice"),
            ),
            "CN=alice,O=Example,C=ES",
        )

    def test_go_order_and_unknown_attributes(self) -> None:
        # Go prints its known attributes in a fixed order whatever the order in
        # the certificate, then the others as OID=#DER-hex.
        self.assertEqual(
            self.dn(
                (NameOID.COMMON_NAME, "alice"),
                (NameOID.EMAIL_ADDRESS, "alice@example.com"),
                (NameOID.ORGANIZATION_NAME, "Example"),
                (NameOID.ORGANIZATIONAL_UNIT_NAME, "Ops"),
                (NameOID.ORGANIZATIONAL_UNIT_NAME, "Dev"),
                (NameOID.DOMAIN_COMPONENT, "example"),
            ),
            "CN=alice,OU=Ops+OU=Dev,O=Example,"
            "0.9.2342.19200300.100.1.25=#13076578616d706c65,"
            "1.2.840.113549.1.9.1=#0c11616c696365406578616d706c652e636f6d",
        )

    def test_escaping(self) -> None:
        self.assertEqual(
            self.dn((NameOID.COMMON_NAME, ' #a,b+c"d\\e<f>g;h# ')),
            'CN=\\ #a\\,b\\+c\\"d\\\\e\\<f\\>g\\;h#\\ ',
        )
        self.assertEqual(self.dn((NameOID.COMMON_NAME, "#x")), "CN=\\#x")
