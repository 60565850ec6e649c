"""
Route authentication end to end: a real server (alone and with --workers 2),
routes added with the real command line, requests made with curl. A refused
request never starts its handler: the handler would write a file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import bcrypt
import pytest

from tests.support.kapowserver import KapowServer, curl


def signed(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@pytest.fixture(params=[(), ("--workers", "2")], ids=["one", "workers"])
def guarded(request, start_server, tmp_path: Path) -> tuple[KapowServer, Path]:
    server = start_server(extra=request.param)
    (tmp_path / "secret").write_text("It's a Secret to Everybody\n")
    (tmp_path / "tokens").write_text("token-one\ntoken-two\n")
    hashed = bcrypt.hashpw(b"open sesame", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")
    (tmp_path / "htpasswd").write_text(f"ali:{hashed}\n")
    ran = tmp_path / "ran"
    ran.mkdir()
    mark = f"touch {ran}/$(kapow get /route/id); "
    server.add_route(
        "/hook",
        mark + "kapow get /request/body | sha256sum | kapow set /response/body",
        "-X", "POST",
        "--auth-hmac", f"X-Hub-Signature-256:{tmp_path}/secret:sha256:sha256=",
    )  # fmt: skip
    server.add_route(
        "/token", mark + "echo ok | kapow set /response/body", "--auth-bearer", str(tmp_path / "tokens")
    )
    server.add_route(
        "/user",
        mark + "kapow get /request/auth/user | kapow set /response/body",
        "--auth-basic",
        str(tmp_path / "htpasswd"),
    )
    server.add_route("/anon", mark + "kapow get /request/auth/user || echo none | kapow set /response/body")
    server.add_route(
        "/far", mark + "echo ok | kapow set /response/body", "--allow", "10.0.0.0/8", "--allow", "::1/128"
    )
    return server, ran


def status(result) -> str:
    return result.stdout.rsplit("\n", 1)[-1]


def test_a_github_style_signed_request_passes_and_refusals_start_nothing(guarded) -> None:
    server, ran = guarded
    body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
    result = curl(
        "-w",
        "\n%{http_code}",
        "--data-binary",
        "@-",
        "-H",
        "X-Hub-Signature-256: " + signed(b"It's a Secret to Everybody", body),
        server.user + "/hook",
        input=body,
    )
    assert (
        result.stdout.decode().endswith("\n200")
        and hashlib.sha256(body).hexdigest().encode() in result.stdout
    )
    assert len(list(ran.iterdir())) == 1
    for f in ran.iterdir():
        f.unlink()

    refused = [
        # a tampered body
        ("-X", "POST", "--data-binary", body.decode() + " ", "-H",
         "X-Hub-Signature-256: " + signed(b"It's a Secret to Everybody", body), "/hook", "401"),
        # a missing header
        ("-X", "POST", "--data-binary", body.decode(), "/hook", "401"),
        # a malformed signature
        ("-X", "POST", "--data-binary", body.decode(), "-H", "X-Hub-Signature-256: sha256=%%%", "/hook", "401"),
        # a wrong token, none, or a malformed header
        ("-H", "Authorization: Bearer token-three", "/token", "401"),
        ("/token", "401"),
        ("-H", "Authorization: Bearer", "/token", "401"),
        # a wrong Basic password, an unknown user, garbage
        ("-u", "ali:open barley", "/user", "401"),
        ("-u", "bob:open sesame", "/user", "401"),
        ("-H", "Authorization: Basic @@@", "/user", "401"),
        # an address outside allow
        ("/far", "403"),
    ]  # fmt: skip
    for *args, path, code in refused:
        result = curl("-o", "/dev/null", "-w", "%{http_code}", *args, server.user + path)
        assert result.stdout == code, (args, path, result.stdout, server.output()[-2000:])
    assert list(ran.iterdir()) == []
    assert "WWW-Authenticate: Bearer" in curl("-i", server.user + "/token").stdout
    assert 'WWW-Authenticate: Basic realm="kapow"' in curl("-i", server.user + "/user").stdout
    server.wait_log(r"refused GET /far \(route \S+\): address 127\.0\.0\.1 is not allowed")


def test_passing_requests_run_and_see_the_basic_user(guarded) -> None:
    server, ran = guarded
    assert curl("-H", "Authorization: Bearer token-two", server.user + "/token").stdout == "ok\n"
    assert curl("-u", "ali:open sesame", server.user + "/user").stdout == "ali"
    assert curl(server.user + "/anon").stdout == "none\n"
    assert len(list(ran.iterdir())) == 3
    server.wait_log(r'127\.0\.0\.1 [0-9a-f]{32} ali \[[^\]]+\] "GET /user HTTP/1\.1" 200 ')


def test_unusable_auth_is_refused_by_the_control_api_and_the_command_line(
    server: KapowServer, tmp_path: Path
) -> None:
    (tmp_path / "htpasswd").write_text("ali:plaintext\n")
    for flags in (
        ("--allow", "10.0.0.0/33"),
        ("--auth-bearer", str(tmp_path / "missing")),
        ("--auth-basic", str(tmp_path / "htpasswd")),
        ("--auth-hmac", f"X-Sig:{tmp_path}/missing"),
        ("--auth-hmac", "X-Sig"),
    ):
        result = server.kapow("route", "add", "/x", "-c", "true", *flags)
        assert result.returncode == 1 and result.stdout == "", flags
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for auth, detail in (
        (
            {"allow": ["nope"]},
            "auth: bad network 'nope': 'nope' does not appear to be an IPv4 or IPv6 network",
        ),
        (
            {"bearer_tokens_file": str(tmp_path / "missing")},
            f"auth: cannot read {tmp_path / 'missing'}: No such file or directory",
        ),
        (
            {"basic_users_file": str(tmp_path / "htpasswd")},
            f"auth: {tmp_path / 'htpasswd'}, line 1: not user:bcrypt-hash (only bcrypt is accepted)",
        ),
    ):
        answer = server.curl_control(
            "-i", "-X", "POST", "--data-binary", "@-", server.control + "/routes",
            input=json.dumps({"method": "GET", "url_pattern": "/x", "auth": auth}).encode(),
        )  # fmt: skip
        head, _, refusal = answer.stdout.partition(b"\r\n\r\n")
        assert head.split(b"\r\n", 1)[0] == b"HTTP/1.1 422 Invalid Route", answer.stdout
        assert json.loads(refusal) == {"reason": "Invalid Route", "detail": detail}
    assert json.loads(server.kapow("route", "list").stdout) == []
