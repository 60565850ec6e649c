"""
The reference documentation's examples, run as they are written against a
real server: HTTPS with client certificates from its "Using HTTPS and mTLS"
page and its tutorial, with certificates made by openssl as the
documentation makes them; and what an HTTPS client sees as the reference
shows it: the version a handler reads for each protocol, the answer to
plain HTTP sent to the HTTPS port, and no ``Content-Type`` on an answer
without a body (but ``Content-Length: 0``).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support.kapowserver import KAPOW, KapowServer, curl, write_program

#: The answer of Go's HTTPS server to a plain HTTP request, byte for byte.
PLAIN_HTTP_ANSWER = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"

#: An init program adding the route the documentation's curl asks for.
ENDPOINT_ROUTE = """#!/bin/sh
kapow route add /endpoint -c 'echo "Hello, $(kapow get /ssl/client/i/dn)" | kapow set /response/body'
"""


def openssl(directory: Path, *args: str) -> None:
    result = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    As the documentation makes them: a self-signed server certificate
    (``openssl req -x509 ... -nodes``, for localhost and 127.0.0.1), a CA,
    and a client certificate the CA signed; RSA keys, of 2048 bits to be
    quick. Files: cert.pem, key.pem, clientca.pem, client.pem, client.key.
    """
    directory = tmp_path_factory.mktemp("certificates")
    openssl(
        directory, "req", "-x509", "-newkey", "rsa:2048", "-keyout", "key.pem", "-out", "cert.pem",
        "-days", "365", "-nodes", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
    )  # fmt: skip
    openssl(
        directory, "req", "-x509", "-newkey", "rsa:2048", "-keyout", "clientca.key", "-out", "clientca.pem",
        "-days", "1", "-nodes", "-subj", "/CN=Client CA",
    )  # fmt: skip
    openssl(
        directory, "req", "-newkey", "rsa:2048", "-keyout", "client.key", "-out", "client.csr",
        "-nodes", "-subj", "/CN=alice",
    )  # fmt: skip
    openssl(
        directory, "x509", "-req", "-in", "client.csr", "-CA", "clientca.pem", "-CAkey", "clientca.key",
        "-CAcreateserial", "-out", "client.pem", "-days", "1",
    )  # fmt: skip
    return directory


def server_in(start_server: Any, directory: Path, *args: str) -> KapowServer:
    """``kapow server ARGS`` started in ``directory``, as the documentation's commands are."""
    return start_server(command=["env", "-C", str(directory), KAPOW, "server"], extra=args)


def wait_for_init(server: KapowServer, program: str) -> None:
    """Wait until the init program ``program`` has run to its end, with success."""
    server.wait_log(rf"\] {re.escape(program)} exited with status 0", timeout=30)


def localhost(server: KapowServer) -> str:
    """The user interface's URL with the name its certificate holds, as the documentation's curl has it."""
    return server.user.replace("127.0.0.1", "localhost")


@pytest.mark.parametrize(
    ("files", "args"),
    [
        pytest.param(
            {"key.pem": "key.pem", "cert.pem": "cert.pem", "clientca.pem": "clientca.pem"},
            ("--keyfile", "key.pem", "--certfile", "cert.pem", "--clientauth=true",
             "--clientcafile", "clientca.pem", "foobar-route"),
            id="https_mtls page",
        ),
        pytest.param(
            {"cert.pem": "cert", "key.pem": "key", "clientca.pem": "clientCAfile"},
            ("--certfile", "cert", "--keyfile", "key", "--clientauth", "true",
             "--clientcafile", "clientCAfile", "awesome-route"),
            id="tutorial",
        ),
    ],
)  # fmt: skip
def test_the_documented_mtls_command_serves_only_clients_with_a_certificate(
    start_server: Any, certificates: Path, tmp_path: Path, files: dict[str, str], args: tuple[str, ...]
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    for made, named in files.items():
        shutil.copy(certificates / made, site / named)
    program = args[-1]
    write_program(site / program, ENDPOINT_ROUTE)
    server = server_in(start_server, site, *args)
    wait_for_init(server, program)
    url = localhost(server) + "/endpoint"
    ca = str(certificates / "cert.pem")

    known = curl("--cacert", ca, "--cert", str(certificates / "client.pem"),
                 "--key", str(certificates / "client.key"), url)  # fmt: skip
    assert (known.returncode, known.stdout) == (0, "Hello, CN=alice\n"), known.stderr

    unknown = curl("--cacert", ca, url)
    assert unknown.returncode != 0
    assert unknown.stdout == ""


@pytest.fixture(params=[(), ("--workers", "2")], ids=["one", "workers"])
def https(request: Any, start_server: Any, certificates: Path, tmp_path: Path) -> KapowServer:
    """An HTTPS server, without client certificates, with a route answering the request's version."""
    program = write_program(
        tmp_path / "routes.pow",
        "#!/bin/sh\nkapow route add /version -c 'kapow get /request/version | kapow set /response/body'\n",
    )
    server = start_server(
        program,
        extra=("--certfile", str(certificates / "cert.pem"), "--keyfile", str(certificates / "key.pem"),
               *request.param),
    )  # fmt: skip
    wait_for_init(server, program)
    return server


@pytest.mark.parametrize(
    ("protocol", "version"),
    [
        # curl offers ALPN "http/1.0" with --http1.0, which HTTPS servers refuse
        (("--http1.0", "--no-alpn"), "HTTP/1.0"),
        (("--http1.1",), "HTTP/1.1"),
        (("--http2",), "HTTP/2.0"),
    ],
    ids=["1.0", "1.1", "2"],
)
def test_the_request_version_is_spelled_as_the_reference_spells_it(
    https: KapowServer, certificates: Path, protocol: tuple[str, ...], version: str
) -> None:
    result = curl(*protocol, "--cacert", str(certificates / "cert.pem"), localhost(https) + "/version")
    assert (result.returncode, result.stdout) == (0, version), result.stderr


def exchange(url: str, request: bytes) -> bytes:
    """Send ``request`` in clear to the host and port of ``url``; what comes back until the server closes."""
    address = urlsplit(url)
    assert address.hostname is not None and address.port is not None
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_plain_http_to_the_https_port_gets_the_reference_answer(
    https: KapowServer, certificates: Path
) -> None:
    assert exchange(https.user, b"GET /version HTTP/1.1\r\nHost: localhost\r\n\r\n") == PLAIN_HTTP_ANSWER
    assert exchange(https.user, b"POST /version HTTP/1.1\r\nContent-Length: 0\r\n\r\n") == PLAIN_HTTP_ANSWER

    result = curl("-i", https.user.replace("https:", "http:") + "/version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "HTTP/1.0 400 Bad Request\n\nClient sent an HTTP request to an HTTPS server.\n"

    # what starts no HTTP request the reference recognises is only closed, as before
    assert exchange(https.user, b"DELETE /version HTTP/1.1\r\n\r\n") == b""
    # the control interface, always mutual TLS, only closes
    assert exchange(https.control, b"GET /routes HTTP/1.1\r\n\r\n") == b""
    # HTTPS goes on as before
    served = curl("--http1.1", "--cacert", str(certificates / "cert.pem"), localhost(https) + "/version")
    assert served.stdout == "HTTP/1.1", served.stderr


def answer_head(url: str, *args: str) -> tuple[str, dict[str, str]]:
    """The status line and the headers (lower-cased names) of the answer to ``curl ARGS URL``."""
    result = curl("-sS", "-o", "/dev/null", "-D", "-", *args, url)
    assert result.returncode == 0, result.stderr
    status, *lines = result.stdout.strip().splitlines()
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return status, headers


@pytest.mark.parametrize("how", ["one process", "two workers over HTTPS"])
def test_an_answer_without_a_body_has_no_content_type_and_says_its_length(
    start_server: Any, tmp_path: Path, certificates: Path, how: str
) -> None:
    program = write_program(
        tmp_path / "routes.pow",
        """#!/bin/sh
kapow route add /empty -c 'true'
kapow route add /typed -c 'kapow set /response/headers/Content-Type text/x-typed'
kapow route add /no-content -c 'kapow set /response/status 204'
kapow route add /not-modified -c 'kapow set /response/status 304'
kapow route add /buffered --buffer -c 'true'
kapow route add /buffered-no-content --buffer -c 'kapow set /response/status 204'
kapow route add /no-content-written -c 'kapow set /response/status 204; echo "<p>x</p>" | kapow set /response/body'
kapow route add /buffered-no-content-written --buffer -c 'kapow set /response/status 204; echo "<p>x</p>" | kapow set /response/body'
kapow route add /text -c 'echo hello | kapow set /response/body'
kapow route add -X HEAD /head-empty -c 'true'
kapow route add -X HEAD /head-text -c 'echo hello | kapow set /response/body'
""",
    )
    tls: tuple[str, ...] = ()
    if how == "one process":
        server = start_server(program)
        base = server.user
    else:
        cert, key = str(certificates / "cert.pem"), str(certificates / "key.pem")
        server = start_server(program, extra=("--workers", "2", "--certfile", cert, "--keyfile", key))
        base, tls = localhost(server), ("--http1.1", "--cacert", cert)
    wait_for_init(server, program)

    # an empty body is announced with Content-Length: 0, as the reference
    # does, except where a status or HEAD allows none
    for path, status, length in (
        ("/empty", "200", "0"),
        ("/no-content", "204", None),
        ("/not-modified", "304", None),
        ("/buffered", "200", "0"),
        ("/buffered-no-content", "204", None),
        # a body written where the status allows none is dropped, and not typed either
        ("/no-content-written", "204", None),
        ("/buffered-no-content-written", "204", None),
    ):
        line, headers = answer_head(base + path, *tls)
        assert line.split()[1] == status, (path, line)
        assert "content-type" not in headers, (path, headers)
        assert headers.get("content-length") == length, (path, headers)
        assert "transfer-encoding" not in headers, (path, headers)
    line, headers = answer_head(base + "/head-empty", *tls, "-I")
    assert "content-type" not in headers, headers
    assert "content-length" not in headers, headers

    # a type the handler set, or one sniffed from a body, as before
    assert answer_head(base + "/typed", *tls)[1]["content-type"] == "text/x-typed"
    assert answer_head(base + "/text", *tls)[1]["content-type"] == "text/plain; charset=utf-8"
    assert answer_head(base + "/head-text", *tls, "-I")[1]["content-type"] == "text/plain; charset=utf-8"
