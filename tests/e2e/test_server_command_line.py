"""
The command line of the real ``kapow server``, as the reference reads it:
options wherever they stand among the init programs, boolean options with a
value, one line for a bad option, and the reference's documented commands
for client certificates.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.kapowserver import KAPOW, curl, write_program
from tests.support.pki import make_pki

#: A listener that cannot be opened: the start must stop at the command line, before it.
UNUSED = "127.0.0.1:1"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bnd", UNUSED], "option --bnd not recognized"),
        (["prog", "--bnd", UNUSED], "option --bnd not recognized"),
        (["--bind", UNUSED, "prog1", "prog2", "--bnd=x"], "option --bnd not recognized"),
        (["prog", "-x"], "option -x not recognized"),
        (["--bi", UNUSED], "option --bi not recognized"),
        (["prog", "--log-format=text"], "option --log-format not recognized"),
        (["prog", "--clientauth=yes"], "--clientauth must be true or false, not 'yes'"),
        (["prog", "--bind"], "option --bind requires argument"),
    ],
)
def test_a_bad_option_anywhere_is_one_line_and_status_1(args: list[str], message: str) -> None:
    result = subprocess.run([KAPOW, "server", *args], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"kapow server: {message} (see kapow server --help)\n"


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one", "workers"])
def test_options_after_an_init_program_take_effect(
    start_server, tmp_path: Path, workers: tuple[str, ...]
) -> None:
    first = write_program(
        tmp_path / "first.pow",
        "#!/bin/sh\nkapow route add /hello -c 'echo on-stdout; echo hello | kapow set /response/body'\n",
    )
    second = write_program(tmp_path / "second.pow", f"#!/bin/sh\ntouch {tmp_path / 'second-ran'}\n")
    # kapow server first.pow --bind 127.0.0.1:0 ... --debug second.pow
    server = start_server(second, command=[KAPOW, "server", first], extra=("--debug", *workers))
    assert server.user.startswith("http://127.0.0.1:")
    if workers:
        server.wait_log(r"worker 2 serves \(")
    server.wait_log(r"first\.pow exited with status 0")
    server.wait_log(r"second\.pow exited with status 0")
    assert (tmp_path / "second-ran").exists()
    assert curl(server.user + "/hello").stdout == "hello\n"
    server.wait_log(r"[0-9a-f]{32}: on-stdout")  # --debug logs the handler's stdout


@pytest.mark.parametrize(
    "clientauth", [("--clientauth", "true"), ("--clientauth=true",)], ids=["separate", "equals"]
)
def test_the_reference_s_client_certificate_commands(
    start_server, tmp_path: Path, clientauth: tuple[str, ...]
) -> None:
    pki = make_pki(tmp_path)
    route = write_program(
        tmp_path / "awesome-route",
        "#!/bin/sh\nkapow route add /dn -c 'kapow get /ssl/client/i/dn | kapow set /response/body'\n",
    )
    # kapow server --certfile C --keyfile K --clientauth true --clientcafile CA awesome-route
    extra = ("--certfile", str(pki.server_chain), "--keyfile", str(pki.server_key), *clientauth)
    server = start_server(route, extra=(*extra, "--clientcafile", str(pki.ca)))
    server.wait_log(r"awesome-route exited with status 0")
    url = server.user.replace("127.0.0.1", "localhost") + "/dn"
    with_cert = curl(
        "--cacert", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key), url
    )
    assert with_cert.stdout == "CN=alice,O=Example", with_cert.stderr
    without = curl("--cacert", str(pki.ca), url)
    assert without.returncode != 0 and without.stdout == ""
