"""The control client behind ``kapow route``: pinned mutual TLS on the standard library.

Real servers (``kapow server`` children, or a one-connection ``ssl`` server
for certificates a kapow server would not load), real certificates.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from kapow.commands import control as control_cli
from kapow.commands import control_call as control_https
from kapow.core import credentials
from kapow.core.credentials import ControlCredentials, CredentialsError
from tests.support.kapowserver import KapowServer, bare_environ, run_kapow, run_then_modules
from tests.support.pki import _cert, _key_pem, _name, _pem

HEAVY = ("twisted", "treq", "klein", "OpenSSL", "cryptography")
# Standard modules (and packages) that `kapow route` keeps out: dataclasses
# brings inspect along; http.client brings email, urllib, calendar and random;
# argparse's own help formatter brings shutil, bz2 and lzma; the idna codec
# brings stringprep and unicodedata.  None of the modules that command needs
# imports them.
LEFT_OUT = (
    "dataclasses", "inspect", "secrets", "http", "email", "urllib", "calendar", "random",
    "typing", "contextlib", "datetime", "ipaddress", "shutil", "bz2", "lzma",
    "encodings.idna", "stringprep", "unicodedata",
)  # fmt: skip


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


def _operator_environ(server: KapowServer, directory: Path | None = None) -> dict[str, str]:
    env = bare_environ()
    env["KAPOW_CONTROL_URL"] = server.control
    env["KAPOW_CONTROL_CREDENTIALS"] = str(directory or server.creds)
    return env


def _init_program_environ(server: KapowServer) -> dict[str, str]:
    env = bare_environ()
    env["KAPOW_CONTROL_URL"] = server.control
    env.update(credentials.credentials_environ(_client_credentials(server)))
    return env


def _route(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_kapow(env, "route", *args)


def _assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """One line on stderr: ``kapow: ...`` from the control API, ``kapow route ACTION: ...`` for the rest."""
    assert (result.returncode, result.stdout) == (1, ""), result
    assert re.match(r"kapow( route \w+)?: ", result.stderr) and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def _route_then_modules(env: dict[str, str], *args: str) -> tuple[list[str], set[str]]:
    """The output lines of ``kapow route ARGS`` and the modules it imported."""
    run, modules = run_then_modules(env, "route", *args)
    assert (run.returncode, run.stderr) == (0, ""), run
    return run.stdout.splitlines(), modules


@pytest.mark.parametrize("environ", [_operator_environ, _init_program_environ])
def test_each_route_action_without_twisted_cryptography_or_http_client(server: KapowServer, environ) -> None:
    env = environ(server)
    added_lines, modules = _route_then_modules(env, "add", "/hi", "-c", "echo hi")
    imported = [modules]
    added = json.loads(added_lines[0])
    assert (added["method"], added["url_pattern"], added["command"]) == ("GET", "/hi", "echo hi")
    for args, lines in (
        (("list",), [json.dumps([added])]),
        (("get", added["id"]), [json.dumps(added)]),
        (("remove", added["id"]), []),
    ):
        output, modules = _route_then_modules(env, *args)
        assert [json.loads(line) for line in output] == [json.loads(line) for line in lines]
        imported.append(modules)
    for modules in imported:
        assert "kapow.commands.control_call" in modules
        assert [m for m in modules if m.split(".")[0] in HEAVY] == []
        assert [m for m in modules if m in LEFT_OUT or m.split(".")[0] in LEFT_OUT] == []


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


EMPTY_LIST = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]"
# In the pieces of an answer: wait until the client gives up and closes.
HANG = None


@contextmanager
def _one_https_answer(
    tmp_path: Path,
    cert_pem: bytes,
    key_pem: bytes,
    client_cert_pem: bytes,
    pieces: Sequence[bytes | None] = (EMPTY_LIST,),
    requests: list[bytes] | None = None,
) -> Iterator[str]:
    """An HTTPS URL answering one request to a client presenting ``client_cert_pem``.

    The answer is ``pieces``, each sent by itself (so in a TLS record of its
    own), then the connection is closed; ``requests`` gets the request.
    """
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
                request = _read_request(tls)
                if requests is not None:
                    requests.append(request)
                for piece in pieces:
                    if piece is HANG:
                        tls.recv(1)
                    else:
                        tls.sendall(piece)
        except OSError:
            pass  # a refused handshake, or a client that stopped reading, as the test wants

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        thread.join(10)
        listener.close()


def _read_request(tls: ssl.SSLSocket) -> bytes:
    """One request: its head, and its body by its Content-Length."""
    request = b""
    while b"\r\n\r\n" not in request:
        request += tls.recv(4096)
    head = request.partition(b"\r\n\r\n")[0]
    lengths = [
        line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    ]
    while len(request) < len(head) + 4 + sum(int(length) for length in lengths):
        request += tls.recv(4096)
    return request


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


# -- reading answers: framing, bounds and malformed answers -----------------------------


@pytest.fixture(scope="module")
def pinned() -> ControlCredentials:
    return credentials.generate_control_credentials("127.0.0.1:1")


def _answer_call(
    tmp_path: Path,
    creds: ControlCredentials,
    pieces: Sequence[bytes | None],
    expected: int = 200,
    requests: list[bytes] | None = None,
    **call: object,
) -> tuple[str, str]:
    """``(URL, text or ControlError text)`` of a call answered with ``pieces``."""
    served = (creds.server_cert_pem, creds.server_key_pem, creds.client_cert_pem)
    with _one_https_answer(tmp_path, *served, pieces, requests) as url:
        arguments = {"method": "GET", "path": "/routes", "body": None, **call}
        try:
            return url, control_https.call(_context(creds), url, expected=expected, **arguments)  # type: ignore[arg-type]
        except control_https.ControlError as e:
            return url, f"ControlError: {e}"


def _chunk(data: bytes, extension: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n" % (len(data), extension, data)


LISTING = b'[{"id": "a"}, {"id": "b"}]'
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("pieces", "expected", "text"),
    [
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: %d\r\nContent-Type: application/json\r" % len(LISTING),
             b"\n\r\n" + LISTING[:5], LISTING[5:]],
            200, LISTING, id="content-length, in pieces",
        ),
        pytest.param(
            [CHUNKED + _chunk(LISTING[:1], b";name=value"), _chunk(LISTING[1:9], b' ; a ; b="x;y"'),
             b"00000000D\r\n" + LISTING[9:22] + b"\r\n", _chunk(LISTING[22:]),
             b"0;last=1\r\nX-Checksum: 1\r\nX-Other: 2\r\n\r\n"],
            200, LISTING, id="chunked, with extensions and trailers",
        ),
        pytest.param(
            [CHUNKED.replace(b"Transfer-Encoding", b"TRANSFER-ENCODING").replace(b"chunked", b"Chunked"),
             _chunk(b"[") + _chunk(b"]") + b"0\r\n", b"\r\n"],
            200, b"[]", id="chunked, names and values in any case, no trailers",
        ),
        pytest.param(
            [CHUNKED.replace(b"\r\n\r\n", b"\r\nContent-Length: 999\r\n\r\n") + _chunk(LISTING) + b"0\r\n\r\n"],
            200, LISTING, id="Transfer-Encoding wins over Content-Length",
        ),
        pytest.param(
            [b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n", LISTING[:3], LISTING[3:]],
            200, LISTING, id="until the connection closes",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\nX-Folded: one\n two\nContent-Length: 2\n\n[]"],
            200, b"[]", id="bare line feeds and a folded header",
        ),
        pytest.param(
            [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n", EMPTY_LIST],
            200, b"[]", id="interim answers are skipped",
        ),
        pytest.param(
            [b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"], 204, b"", id="no content",
        ),
        pytest.param(
            [CHUNKED.replace(b"200 OK", b"404 Not Found"), _chunk(b'{"reason": "Route'),
             _chunk(b' Not Found"}') + b"0\r\n\r\n"],
            200, b"ControlError: Route Not Found", id="the reason of another status",
        ),
        pytest.param(
            [b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops"],
            200, b"ControlError: HTTP 500", id="another status without a reason",
        ),
    ],
)  # fmt: skip
def test_answers_are_read_by_their_framing(
    tmp_path: Path, pinned: ControlCredentials, pieces: list[bytes], expected: int, text: bytes
) -> None:
    assert _answer_call(tmp_path, pinned, pieces, expected)[1] == text.decode()


@pytest.mark.parametrize(
    ("pieces", "why"),
    [
        pytest.param([], "the server closed the connection without answering", id="no answer"),
        pytest.param([b"garbage\r\n\r\n"], "malformed status line 'garbage'", id="status line"),
        pytest.param([b"HTTP/1.1 2000 OK\r\n\r\n"], "malformed status line 'HTTP/1.1 2000 OK'", id="status code"),
        pytest.param([b"HTTP/2 200\r\n\r\n"], "malformed status line 'HTTP/2 200'", id="version"),
        pytest.param([b"\r\n"], "malformed status line ''", id="empty head"),
        pytest.param(
            [b"HTTP/1.1 200\x00OK\rmore\r\n\r\n"], "malformed status line 'HTTP/1.1 200\\x00OK\\rmore'",
            id="status line shown on one line",
        ),
        pytest.param(
            [b"SSH-2.0-" + b"x" * 100 + b"\r\n\r\n"], f"malformed status line 'SSH-2.0-{'x' * 72}'...",
            id="status line cut",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nX-Filler: " + b"x" * control_https.HEAD_LIMIT + b"\r\n\r\n[]"],
            f"the answer's head is over {control_https.HEAD_LIMIT} bytes", id="one long header",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\n", *[b"X-Filler: xxxxxx\r\n" * 256] * 16, b"\r\n[]"],
            f"the answer's head is over {control_https.HEAD_LIMIT} bytes", id="many headers",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-"], "the connection closed in the middle of the answer's head",
            id="closed in the head",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"12345"],
            "the connection closed in the middle of the body (5 of 10 bytes)", id="closed in the body",
        ),
        pytest.param(
            [CHUNKED + _chunk(b"[]"), b"a\r\n1234"],
            "the connection closed in the middle of a chunk (4 of 10 bytes)", id="closed in a chunk",
        ),
        pytest.param(
            [CHUNKED + _chunk(b"[]")], "the connection closed in the middle of a chunk size line",
            id="closed before the last chunk",
        ),
        pytest.param(
            [CHUNKED + _chunk(b"[]") + b"0\r\nX-Checksum: 1\r\n"],
            "the connection closed in the middle of the trailer section", id="closed in the trailers",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n"], "malformed header line 'No colon here'",
            id="header line",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nBad name: x\r\n\r\n"], "malformed header line 'Bad name: x'",
            id="header name",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\n folded first\r\n\r\n"], "malformed header line ' folded first'",
            id="folding without a header",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n[]"],
            "malformed Content-Length '2, 3'", id="Content-Lengths that disagree",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n[]"], "malformed Content-Length '-2'",
            id="negative Content-Length",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n[]" % (control_https.BODY_LIMIT + 1)],
            f"the body is over {control_https.BODY_LIMIT} bytes (Content-Length: {control_https.BODY_LIMIT + 1})",
            id="Content-Length over the limit",
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"],
            "unsupported Transfer-Encoding 'gzip, chunked'", id="another transfer coding",
        ),
        pytest.param([CHUNKED + b"zz\r\n"], "malformed chunk size line 'zz'", id="chunk size"),
        pytest.param([CHUNKED + b"\r\n"], "malformed chunk size line ''", id="empty chunk size"),
        pytest.param(
            [CHUNKED + b"1;" + b"x" * control_https.CHUNK_LINE_LIMIT + b"\r\n"],
            f"a chunk size line is over {control_https.CHUNK_LINE_LIMIT} bytes", id="chunk size line over the limit",
        ),
        pytest.param(
            [CHUNKED + b"2\r\n[]]\r\n0\r\n\r\n"], "a chunk is longer than its size line says",
            id="chunk longer than its size",
        ),
        pytest.param(
            [CHUNKED + b"fffffffffff\r\n"], f"the body is over {control_https.BODY_LIMIT} bytes",
            id="chunk over the limit",
        ),
        pytest.param(
            [CHUNKED + _chunk(b"[]") + b"0\r\nX-Filler: " + b"x" * control_https.HEAD_LIMIT + b"\r\n\r\n"],
            f"the trailer section is over {control_https.HEAD_LIMIT} bytes", id="trailers over the limit",
        ),
    ],
)  # fmt: skip
def test_a_malformed_or_cut_answer_is_one_clear_line(
    tmp_path: Path, pinned: ControlCredentials, pieces: list[bytes], why: str
) -> None:
    url, text = _answer_call(tmp_path, pinned, pieces)
    assert text == f"ControlError: cannot reach control API at {url}: {why}"


def test_bodies_until_close_and_in_chunks_are_bounded(
    tmp_path: Path, pinned: ControlCredentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control_https, "BODY_LIMIT", 100)
    head = b"HTTP/1.1 200 OK\r\n\r\n"
    assert _answer_call(tmp_path, pinned, [head, b"x" * 100])[1] == "x" * 100
    url, text = _answer_call(tmp_path, pinned, [head, b"x" * 60, b"x" * 41])
    assert text == f"ControlError: cannot reach control API at {url}: the body is over 100 bytes"
    url, text = _answer_call(tmp_path, pinned, [CHUNKED, _chunk(b"x" * 60), _chunk(b"x" * 41), b"0\r\n\r\n"])
    assert text == f"ControlError: cannot reach control API at {url}: the body is over 100 bytes"


def test_a_server_that_does_not_answer_times_out(tmp_path: Path, pinned: ControlCredentials) -> None:
    url, text = _answer_call(tmp_path, pinned, [b"HTTP/1.1 200 OK\r\n", HANG], timeout=0.5)
    assert text == f"ControlError: cannot reach control API at {url}: The read operation timed out"


def test_the_request(tmp_path: Path, pinned: ControlCredentials) -> None:
    requests: list[bytes] = []
    body = {"method": "GET", "url_pattern": "/caf\u00e9", "index": 0}
    created = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}"
    put, text = _answer_call(tmp_path, pinned, [created], 201, requests, method="PUT", body=body)
    assert text == "{}"
    delete, _ = _answer_call(
        tmp_path, pinned, [EMPTY_LIST], 200, requests, method="DELETE", path="/routes/a%2Fb"
    )
    payload = json.dumps(body).encode()
    assert requests == [
        b"PUT /routes HTTP/1.1\r\nHost: %s\r\nAccept-Encoding: identity\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (put.removeprefix("https://").encode(), len(payload), payload),
        b"DELETE /routes/a%%2Fb HTTP/1.1\r\nHost: %s\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
        % delete.removeprefix("https://").encode(),
    ]


@pytest.mark.parametrize(
    ("url", "target", "authority"),
    [
        ("https://127.0.0.1:8081", ("127.0.0.1", 8081, ""), "127.0.0.1:8081"),
        ("https://[::1]:8081", ("::1", 8081, ""), "[::1]:8081"),
        ("https://[::1]", ("::1", 443, ""), "[::1]"),
        ("HTTPS://Control.Example:1/kapow/?q#f", ("control.example", 1, "/kapow"), "control.example:1"),
        (" https://user:secret@localhost:2/a/b/", ("localhost", 2, "/a/b"), "localhost:2"),
        ("https://localhost.:2", ("localhost.", 2, ""), "localhost.:2"),
        (f"https://{'a' * 63}.example:2", (f"{'a' * 63}.example", 2, ""), f"{'a' * 63}.example:2"),
        ("https://local\thost:8081\n", ("localhost", 8081, ""), "localhost:8081"),
        (
            "https://b\u00fccher.example:8081",
            ("xn--bcher-kva.example", 8081, ""),
            "xn--bcher-kva.example:8081",
        ),
    ],
)
def test_control_urls_are_read_as_urlsplit_reads_them(url: str, target: tuple, authority: str) -> None:
    assert control_https._target(url) == target
    assert control_https._authority(*target[:2]) == authority


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8081", "https:/127.0.0.1:8081", "https://", "https://:8081", "https://[::1",
        "https://[::1]x", "https://[localhost]:1", "https://h:0", "https://h:65536", "https://h:+1",
        "https://h:1 ", "https://a..b:1", "https://.a:1", f"https://{'a' * 64}.example:1",
        f"https://example.{'a' * 64}:1", "https://h:1/a b", "https://h:1/caf\u00e9", "https://a\x00b:1",
    ],
)  # fmt: skip
def test_other_control_urls_are_one_clear_line(url: str) -> None:
    with pytest.raises(control_https.ControlError) as caught:
        control_https._target(url)
    assert str(caught.value) == (
        f"cannot reach control API at {url}: not an https://HOST:PORT URL (the control API is HTTPS only)"
    )


@pytest.mark.parametrize("columns", [None, "50", "200", "abc", "0"])
def test_help_is_as_wide_as_argparse_makes_it(monkeypatch: pytest.MonkeyPatch, columns: str | None) -> None:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)

    def help_text(formatter_class: type[argparse.HelpFormatter]) -> str:
        parser = argparse.ArgumentParser(prog="p", description="word " * 60, formatter_class=formatter_class)
        parser.add_argument("--option", help="word " * 60)
        return parser.format_help()

    assert help_text(control_cli.Formatter) == help_text(argparse.RawDescriptionHelpFormatter)


@pytest.mark.parametrize(
    "segment", ["3f1c9a52-0d7e", "a/b", "a b%c?d#e", "caf\u00e9 \u2603", "~_.-", "!*'();:@&=+$,[]", ""]
)
def test_route_ids_are_quoted_as_urllib_quotes_them(segment: str) -> None:
    from urllib.parse import quote

    assert control_cli.quote(segment) == quote(segment, safe="")


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
        _route({**bare_environ(), "KAPOW_CONTROL_CREDENTIALS": str(directory)}, "list"),
        f"kapow route list: {directory / 'client.crt'}: no PEM certificate found\n",
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


def test_queue_and_limit_flags_and_the_handler_command_stay_lean(server: KapowServer) -> None:
    env = _operator_environ(server)
    lines, modules = _route_then_modules(
        env, "add", "/q", "-c", "true", "--max-concurrency", "1", "--queue", "3", "--queue-timeout", "2",
        "--limit", "memory=256M", "--limit", "cpu=10", "--limit", "file_size=1k",
    )  # fmt: skip
    added = json.loads(lines[0])
    assert (added["queue"], added["queue_timeout"]) == (3, 2)
    assert added["limits"] == {"memory": 256 << 20, "cpu": 10, "file_size": 1024}
    imported = [modules]
    for args in (("list",), ("get", "0" * 32), ("kill", "0" * 32)):
        run, modules = run_then_modules(env, "handler", *args)
        output = run.stdout.splitlines()
        if args == ("list",):
            assert (run.returncode, output, run.stderr) == (0, ["[]"], "")
        else:
            assert (run.returncode, output, run.stderr) == (1, [], "kapow: Handler Not Found\n")
        imported.append(modules)
    for modules in imported:
        assert [m for m in modules if m.split(".")[0] in HEAVY] == []
        assert [m for m in modules if m in LEFT_OUT or m.split(".")[0] in LEFT_OUT] == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--limit", "memory=lots"), "memory must be a whole number"),
        (("--limit", "bogus=1"), "unknown limit 'bogus'"),
        (("--limit", "cpu=2.5"), "cpu must be a whole number"),
        (("--limit", "cpu"), "expected NAME=VALUE"),
        (("--queue", "x"), "--queue: invalid int value"),
    ],
)
def test_a_bad_limit_or_queue_flag_is_one_line_and_nothing_is_sent(
    server: KapowServer, args: tuple[str, ...], fragment: str
) -> None:
    _assert_one_error_line(_route(_operator_environ(server), "add", "/x", "-c", "true", *args), fragment)
    assert json.loads(_route(_operator_environ(server), "list").stdout) == []


def test_a_queue_the_server_refuses_is_its_reason(server: KapowServer) -> None:
    refused = _route(_operator_environ(server), "add", "/x", "-c", "true", "--queue", "-1")
    _assert_one_error_line(refused, "Invalid Route")
