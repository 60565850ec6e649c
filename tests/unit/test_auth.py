"""
Request authentication of a route (kapow.core.auth): loading its files, and the
checks it makes before a process starts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from twisted.internet.defer import succeed
from twisted.web.http_headers import Headers

from kapow.core.auth import AuthError, RouteAuth, address_in, normalize
from kapow.core.routes import InvalidRoute, route_from_json


def inline(f: Any, *args: Any) -> Any:
    """Run the 'thread' work at once."""
    return succeed(f(*args))


def result(checked: Any) -> Any:
    if hasattr(checked, "addCallback"):
        found: list = []
        checked.addCallback(found.append)
        return found[0]
    return checked


def check(auth: RouteAuth, headers: dict | None = None, body: bytes = b"", remote: str = "127.0.0.1") -> Any:
    h = Headers({k: [v] for k, v in (headers or {}).items()})
    return result(auth.check(remote, h, io.BytesIO(body), inline))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\n\nalpha\n  beta  \n")
    users = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$")
    users.write_text(f"alice:{hashed}\n")
    secret = tmp_path / "secret"
    secret.write_text("hook-secret\n")
    return {"tokens": str(tokens), "users": str(users), "secret": str(secret)}


def test_bearer_tokens_pass_only_with_one_of_the_file_lines(files: dict[str, str]) -> None:
    auth = RouteAuth(normalize({"bearer_tokens_file": files["tokens"]}))
    assert check(auth, {"Authorization": "Bearer alpha"}) == (None, None)
    assert check(auth, {"Authorization": "bearer beta"}) == (None, None)
    for bad in ("Bearer gamma", "Bearer", "Basic YWxwaGE=", "Bearer # comment", "\xff\xfe"):
        refusal, _ = check(auth, {"Authorization": bad})
        assert (refusal.code, refusal.challenge) == (401, b"Bearer")
    refusal, _ = check(auth)
    assert refusal.code == 401


def test_basic_users_are_checked_with_bcrypt_and_named(files: dict[str, str]) -> None:
    auth = RouteAuth(normalize({"basic_users_file": files["users"]}))
    good = base64.b64encode(b"alice:s3cret").decode()
    assert check(auth, {"Authorization": f"Basic {good}"}) == (None, b"alice")
    for bad in (
        base64.b64encode(b"alice:wrong").decode(),
        base64.b64encode(b"bob:s3cret").decode(),
        base64.b64encode(b"no colon").decode(),
        "!!!not base64",
        "",
    ):
        refusal, user = check(auth, {"Authorization": f"Basic {bad}"})
        assert (refusal.code, refusal.challenge, user) == (401, b'Basic realm="kapow"', None)


def test_an_htpasswd_line_that_is_not_bcrypt_is_refused(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    users.write_text("alice:$apr1$abcdefgh$0123456789abcdefghijkl\n")
    with pytest.raises(AuthError, match="line 1"):
        RouteAuth(normalize({"basic_users_file": str(users)}))


def github_signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def test_an_hmac_signature_of_the_raw_body_passes_and_a_tampered_one_does_not(files: dict[str, str]) -> None:
    spec = normalize(
        {"hmac": {"header": "X-Hub-Signature-256", "secret_file": files["secret"], "prefix": "sha256="}}
    )
    assert spec["hmac"]["algorithm"] == "sha256"
    auth = RouteAuth(spec)
    body = b'{"action": "opened"}' * 5000
    signature = github_signature(b"hook-secret", body)
    assert check(auth, {"X-Hub-Signature-256": signature}, body) == (None, None)
    assert (
        check(auth, {"X-Hub-Signature-256": signature.upper().replace("SHA256=", "sha256=")}, body)[0] is None
    )
    for headers, sent in (
        ({"X-Hub-Signature-256": signature}, body + b" "),
        ({}, body),
        ({"X-Hub-Signature-256": "sha256=zz"}, body),
        ({"X-Hub-Signature-256": "\xff"}, body),
        ({"X-Hub-Signature-256": github_signature(b"other", body)}, body),
    ):
        refusal, _ = check(auth, headers, sent)
        assert refusal.code == 401


def test_allow_lists_networks_and_refuses_others_with_403() -> None:
    auth = RouteAuth(normalize({"allow": ["10.0.0.0/8", "::1", "192.168.1.7"]}))
    for ok in ("10.1.2.3", "::1", "192.168.1.7", "::ffff:10.0.0.1"):
        assert check(auth, remote=ok) == (None, None), ok
    for refused in ("11.0.0.1", "127.0.0.1", "", "not-an-address"):
        assert check(auth, remote=refused)[0].code == 403
    assert address_in("fe80::1%eth0", RouteAuth(normalize({"allow": ["fe80::/10"]})).networks or ())


def test_every_key_given_must_pass(files: dict[str, str]) -> None:
    auth = RouteAuth(normalize({"bearer_tokens_file": files["tokens"], "allow": ["127.0.0.0/8"]}))
    assert check(auth, {"Authorization": "Bearer alpha"}, remote="127.0.0.2") == (None, None)
    assert check(auth, {"Authorization": "Bearer alpha"}, remote="10.0.0.1")[0].code == 403
    assert check(auth, {}, remote="127.0.0.2")[0].code == 401


@pytest.mark.parametrize(
    "auth",
    [
        {},
        [],
        {"nope": 1},
        {"allow": []},
        {"allow": ["10.0.0.0/33"]},
        {"allow": ["garbage"]},
        {"allow": "10.0.0.0/8"},
        {"bearer_tokens_file": ""},
        {"bearer_tokens_file": 3},
        {"bearer_tokens_file": "/nonexistent/tokens"},
        {"hmac": {"header": "X-Sig", "secret_file": "/nonexistent/secret"}},
        {"hmac": {"header": "X Sig", "secret_file": "/etc/hostname"}},
        {"hmac": {"header": "X-Sig", "secret_file": "/etc/hostname", "algorithm": "md17"}},
        {"hmac": {"header": "X-Sig", "secret_file": "/etc/hostname", "unknown": 1}},
        {"basic_users_file": "/etc/hostname"},
    ],
)
def test_a_route_with_unusable_auth_is_invalid(auth: Any) -> None:
    with pytest.raises(InvalidRoute):
        route_from_json({"method": "GET", "url_pattern": "/x", "auth": auth}, "id")


def test_a_route_shows_its_auth_and_reload_keeps_the_old_files_when_new_ones_fail(
    files: dict[str, str],
) -> None:
    route = route_from_json(
        {"method": "GET", "url_pattern": "/x", "auth": {"bearer_tokens_file": files["tokens"]}}, "id"
    )
    assert route.to_json(0)["auth"] == {"bearer_tokens_file": files["tokens"]}
    guard = route.guard
    assert guard is not None
    Path(files["tokens"]).write_text("gamma\n")
    assert guard.reload() is None
    assert check(guard, {"Authorization": "Bearer gamma"}) == (None, None)
    assert check(guard, {"Authorization": "Bearer alpha"})[0].code == 401
    Path(files["tokens"]).unlink()
    assert "cannot read" in (guard.reload() or "")
    assert check(guard, {"Authorization": "Bearer gamma"}) == (None, None)


def test_a_worker_keeps_a_route_whose_files_vanished_but_refuses_its_requests(
    files: dict[str, str],
) -> None:
    data = {"method": "GET", "url_pattern": "/x", "auth": {"bearer_tokens_file": "/nonexistent"}}
    route = route_from_json(data, "id", strict_auth=False)
    assert route.guard is not None and not route.guard.loaded
    assert check(route.guard, {"Authorization": "Bearer alpha"})[0].code == 503


def test_routes_without_auth_have_no_guard() -> None:
    assert route_from_json({"method": "GET", "url_pattern": "/x"}, "id").guard is None
