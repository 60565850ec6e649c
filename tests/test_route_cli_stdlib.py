"""The control client behind ``kapow route``: pinned mutual TLS on the standard library.

Real servers (``kapow server`` children, or a one-connection ``ssl`` server
for certificates a kapow server would not load), real certificates.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from kapow import control_https, credentials
from kapow.credentials import ControlCredentials, CredentialsError
from tests.kapowserver import KAPOW, KapowServer
from tests.pki import _cert, _key_pem, _name, _pem

HEAVY = ("twisted", "treq", "klein", "OpenSSL", "cryptography")
# Standard modules that kapow.credentials keeps out of `kapow route` (dataclasses
# brings inspect along); none of the modules that command needs imports them.
LEFT_OUT = ("dataclasses", "inspect", "secrets")

# Runs ``kapow route ARGS`` in this interpreter, then prints what it imported.
_ROUTE_THEN_MODULES = """\
import json, sys
from kapow.route_cli import main
status = main(sys.argv[1:])
sys.stdout.write(json.dumps(sorted(sys.modules)) + "\\n")
sys.exit(status)
"""


def _client_credentials(server: KapowServer) -> ControlCredentials:
    """What the server wrote for its clients (no server key)."""
    return ControlCredentials(
        server_cert_pem=(server.creds / "server.crt").read_bytes(),
        server_key_pem=b"",
        client_cert_pem=(server.creds / "client.crt").read_bytes(),
        client_key_pem=(server.creds / "client.key").read_bytes(),
    )


def _foreign_server_cert() -> bytes:
    """A self-signed certificate for 127.0.0.1 that no server under test presents.

    Its subject differs from the servers' ``control_server``: OpenSSL looks a
    certificate up in its store by subject, so a same-named one would shadow
    the server's certificate and hide a store that trusts more than the pin.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(CN="foreign")
    return _pem(
        _cert(name, key, name, key, ca=False, san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    )


def _bare_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KAPOW_")}


def _operator_environ(server: KapowServer, directory: Path | None = None) -> dict[str, str]:
    env = _bare_environ()
    env["KAPOW_CONTROL_URL"] = server.control
    env["KAPOW_CONTROL_CREDENTIALS"] = str(directory or server.creds)
    return env


def _init_program_environ(server: KapowServer) -> dict[str, str]:
    env = _bare_environ()
    env["KAPOW_CONTROL_URL"] = server.control
    env.update(credentials.credentials_environ(_client_credentials(server)))
    return env


def _route(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KAPOW, "route", *args], capture_output=True, text=True, env=env, timeout=30)


def _assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert (result.returncode, result.stdout) == (1, ""), result
    assert result.stderr.startswith("kapow: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.mark.parametrize("environ", [_operator_environ, _init_program_environ])
def test_route_add_and_list_without_twisted_or_cryptography(server: KapowServer, environ) -> None:
    env = environ(server)
    runs = []
    for args in (("add", "/hi", "-c", "echo hi"), ("list",)):
        runs.append(
            subprocess.run(
                [sys.executable, "-c", _ROUTE_THEN_MODULES, *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=30,
            )
        )
    for run in runs:
        assert (run.returncode, run.stderr) == (0, ""), run
        modules = json.loads(run.stdout.splitlines()[-1])
        assert "kapow.control_https" in modules
        assert [m for m in modules if m.split(".")[0] in HEAVY] == []
        assert [m for m in modules if m in LEFT_OUT] == []
    added = json.loads(runs[0].stdout.splitlines()[0])
    assert (added["method"], added["url_pattern"], added["command"]) == ("GET", "/hi", "echo hi")
    assert json.loads(runs[1].stdout.splitlines()[0]) == [added]


def test_a_server_certificate_other_than_the_pinned_one_is_refused(
    server: KapowServer, tmp_path: Path
) -> None:
    real = _client_credentials(server)
    wrong_pin = tmp_path / "wrong-pin"
    credentials.write_client_credentials(
        ControlCredentials(_foreign_server_cert(), b"", real.client_cert_pem, real.client_key_pem),
        str(wrong_pin),
    )
    env = _operator_environ(server, wrong_pin)
    # A default trust store would accept the server; the pin must not consult one.
    env["SSL_CERT_FILE"] = str(server.creds / "server.crt")
    env["SSL_CERT_DIR"] = str(server.creds)
    _assert_one_error_line(
        _route(env, "list"),
        f"cannot reach control API at {server.control}: ",
        "not the pinned control server certificate",
    )
    assert _route(_operator_environ(server), "list").stdout == "[]\n"


def test_only_the_first_certificate_of_the_pin_is_trusted(server: KapowServer) -> None:
    real = _client_credentials(server)
    env = _init_program_environ(server)
    env["KAPOW_CONTROL_SERVER_CERT"] = (_foreign_server_cert() + real.server_cert_pem).decode()
    _assert_one_error_line(_route(env, "list"), "not the pinned control server certificate")


def test_a_foreign_client_certificate_is_refused_by_the_server(server: KapowServer, tmp_path: Path) -> None:
    real = _client_credentials(server)
    other = credentials.generate_control_credentials("127.0.0.1:1")
    foreign = tmp_path / "foreign-client"
    credentials.write_client_credentials(
        ControlCredentials(real.server_cert_pem, b"", other.client_cert_pem, other.client_key_pem),
        str(foreign),
    )
    _assert_one_error_line(_route(_operator_environ(server, foreign), "list"), "cannot reach control API")


def test_the_url_host_must_be_in_the_certificate(server: KapowServer) -> None:
    # The server certificate names 127.0.0.1; localhost reaches the same listener.
    env = _operator_environ(server)
    env["KAPOW_CONTROL_URL"] = server.control.replace("127.0.0.1", "localhost")
    _assert_one_error_line(_route(env, "list"), "TLS: Hostname mismatch")


def test_the_common_name_does_not_stand_in_for_a_host_name(start_server, tmp_path: Path) -> None:
    # Without a DNS subjectAltName OpenSSL would match the CN; the pin, like
    # the Twisted client, looks at the subjectAltName only.
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(CN="localhost")
    server_cert = _cert(
        name, key, name, key, ca=False,
        eku=[ExtendedKeyUsageOID.SERVER_AUTH], san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )  # fmt: skip
    generated = credentials.generate_control_credentials("127.0.0.1:1")
    full = tmp_path / "full"
    credentials.write_full_credentials(
        ControlCredentials(
            _pem(server_cert), _key_pem(key), generated.client_cert_pem, generated.client_key_pem
        ),
        str(full),
    )
    server = start_server(extra=("--control-credentials", str(full)))
    assert _route(_operator_environ(server), "list").stdout == "[]\n"
    env = _operator_environ(server)
    env["KAPOW_CONTROL_URL"] = server.control.replace("127.0.0.1", "localhost")
    _assert_one_error_line(_route(env, "list"), "TLS: Hostname mismatch")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback address")
def test_an_ipv6_literal_control_url(start_server) -> None:
    server = start_server(extra=("--control-bind", "[::1]:0"))
    assert server.control.startswith("https://[::1]:")
    added = server.kapow("route", "add", "/v6", "-c", "true")
    assert added.returncode == 0, added.stderr
    listing = server.kapow("route", "list")
    assert [r["url_pattern"] for r in json.loads(listing.stdout)] == ["/v6"]


# -- certificates a kapow server would not load, on a one-connection server ----------


@contextmanager
def _one_https_answer(
    tmp_path: Path, cert_pem: bytes, key_pem: bytes, client_cert_pem: bytes
) -> Iterator[str]:
    """An HTTPS URL answering one request with ``[]`` to a client presenting ``client_cert_pem``."""
    chain, key = tmp_path / "served.crt", tmp_path / "served.key"
    chain.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=client_cert_pem.decode())
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def answer() -> None:
        try:
            connection, _ = listener.accept()
            with context.wrap_socket(connection, server_side=True) as tls:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += tls.recv(4096)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]")
        except OSError:
            pass  # a refused handshake, as the test wants

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        thread.join(10)
        listener.close()


def _context(creds: ControlCredentials) -> ssl.SSLContext:
    return control_https.pinned_context(creds.server_cert_pem, creds.client_cert_pem, creds.client_key_pem)


def test_the_harness_answers_the_pinned_certificate(tmp_path: Path) -> None:
    creds = credentials.generate_control_credentials("127.0.0.1:1")
    with _one_https_answer(
        tmp_path, creds.server_cert_pem, creds.server_key_pem, creds.client_cert_pem
    ) as url:
        assert control_https.call(_context(creds), url, "GET", "/routes", None, 200) == "[]"


def test_a_certificate_issued_with_the_pinned_key_is_refused(tmp_path: Path) -> None:
    creds = credentials.generate_control_credentials("127.0.0.1:1")
    pinned = x509.load_pem_x509_certificate(creds.server_cert_pem)
    pinned_key = serialization.load_pem_private_key(creds.server_key_pem, None)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert(
        _name(CN="impostor"), leaf_key, pinned.subject, pinned_key, ca=False,
        eku=[ExtendedKeyUsageOID.SERVER_AUTH], san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )  # fmt: skip
    refused = pytest.raises(control_https.ControlError, match="not the pinned control server certificate")
    with _one_https_answer(tmp_path, _pem(leaf), _key_pem(leaf_key), creds.client_cert_pem) as url, refused:
        control_https.call(_context(creds), url, "GET", "/routes", None, 200)


# -- credentials -----------------------------------------------------------------------


def test_each_variable_at_fault_is_named() -> None:
    env = credentials.credentials_environ(credentials.generate_control_credentials("localhost:1"))
    for name in env:
        for broken in (
            {k: v for k, v in env.items() if k != name},
            {**env, name: ""},
            {**env, name: "garbage"},
            {**env, name: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"},
            {**env, name: "caf\u00e9"},
        ):
            with pytest.raises(CredentialsError) as caught:
                control_https.context_from_environ(broken)
            assert name in str(caught.value) and "\n" not in str(caught.value)


def test_a_client_key_of_another_certificate_is_refused() -> None:
    env = credentials.credentials_environ(credentials.generate_control_credentials("localhost:1"))
    other = credentials.credentials_environ(credentials.generate_control_credentials("localhost:1"))
    env["KAPOW_CONTROL_CLIENT_KEY"] = other["KAPOW_CONTROL_CLIENT_KEY"]
    with pytest.raises(CredentialsError, match="KAPOW_CONTROL_CLIENT_KEY does not match"):
        control_https.context_from_environ(env)


def test_an_encrypted_client_key_is_refused_without_a_prompt() -> None:
    creds = credentials.generate_control_credentials("localhost:1")
    key = serialization.load_pem_private_key(creds.client_key_pem, None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    env = {**credentials.credentials_environ(creds), "KAPOW_CONTROL_CLIENT_KEY": encrypted.decode()}
    with pytest.raises(CredentialsError, match="KAPOW_CONTROL_CLIENT_KEY: the private key is encrypted"):
        control_https.context_from_environ(env)


def test_the_directory_file_at_fault_is_named(tmp_path: Path) -> None:
    creds = credentials.generate_control_credentials("localhost:1")
    directory = tmp_path / "creds"
    credentials.write_client_credentials(creds, str(directory))
    (directory / "client.crt").write_text("garbage")
    _assert_one_error_line(
        _route({**_bare_environ(), "KAPOW_CONTROL_CREDENTIALS": str(directory)}, "list"),
        f"kapow: {directory / 'client.crt'}: no PEM certificate found",
    )
    (directory / "client.key").chmod(0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        control_https.context_from_directory(str(directory))


def test_no_key_file_is_left_behind_without_memfd(
    server: KapowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_mkstemp = tempfile.mkstemp
    made: list[str] = []

    def mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        made.append(path)
        assert os.stat(path).st_mode & 0o077 == 0
        return fd, path

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    context = control_https.context_from_directory(str(server.creds))
    assert len(made) == 2 and list(scratch.iterdir()) == []
    assert control_https.call(context, server.control, "GET", "/routes", None, 200) == "[]"


def test_only_https_control_urls_are_used(server: KapowServer) -> None:
    env = _operator_environ(server)
    env["KAPOW_CONTROL_URL"] = server.control.replace("https://", "http://")
    _assert_one_error_line(_route(env, "list"), "not an https://HOST:PORT URL")
