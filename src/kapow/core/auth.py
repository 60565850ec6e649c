"""
Request authentication of a route (its ``auth`` field: see the control API
reference, docs/reference/control-api.rst): bearer tokens, Basic users of an
htpasswd file (bcrypt only), an HMAC signature of the raw body, and lists of
client networks.

A route's :class:`RouteAuth` is made when the route is, reading the files it
names, and checks each request before any process starts. Files are read
again by :meth:`RouteAuth.reload` (on ``SIGHUP``); a file that fails to load
then leaves what was loaded before in force.

Pure Python: no Twisted here. A Basic password check (bcrypt, slow on
purpose) is handed to ``defer_to_thread`` so the reactor never waits for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Protocol, TypedDict, TypeVar

__all__ = ["AuthError", "Refusal", "RouteAuth", "parse_networks"]

_KEYS = {"bearer_tokens_file", "basic_users_file", "hmac", "allow"}
_HMAC_KEYS = {"header", "secret_file", "algorithm", "prefix"}
_BCRYPT = re.compile(rb"\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# a valid bcrypt hash of a random password: an unknown user costs one check too
_DUMMY_HASH = b"$2b$10$CwTycUXWue0Thq9StjUM0uGAPS7UozKic8WKZt.EuyeNqkR/GXSUO"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: What a pending check gives in the end (see :meth:`RouteAuth.check`).
_Later = TypeVar("_Later")


class AuthError(ValueError):
    """A route's ``auth`` cannot be used; the message says why (for logs)."""


@dataclass(frozen=True)
class Refusal:
    """
    A request the route's ``auth`` refuses.

    :ivar code: 401 or 403.
    :ivar challenge: the ``WWW-Authenticate`` value to send, if any.
    :ivar why: for the log.
    """

    code: int
    challenge: bytes | None
    why: str


#: What :meth:`RouteAuth.check` decides: (refusal or ``None``, Basic user or ``None``).
Verdict = tuple[Refusal | None, bytes | None]


class HmacSpec(TypedDict):
    """The ``hmac`` rule of a route's ``auth``, defaults filled in."""

    header: str
    secret_file: str
    algorithm: str
    prefix: str


class AuthSpec(TypedDict, total=False):
    """A route's ``auth``, as :func:`normalize` checks it."""

    bearer_tokens_file: str
    basic_users_file: str
    hmac: HmacSpec
    allow: list[str]


class RequestHeaders(Protocol):
    """The headers of a request, as :class:`twisted.web.http_headers.Headers` gives them."""

    def getRawHeaders(self, name: bytes) -> Sequence[bytes] | None:
        """Every value of the header ``name``, or ``None`` if it is absent."""


def parse_networks(values: object) -> tuple[Network, ...]:
    """
    The networks of a list of CIDR texts (``10.0.0.0/8``, ``::1``; a bare
    address is a network of one).

    :raises AuthError: if ``values`` is not a non-empty list of valid CIDR texts.
    """
    if not isinstance(values, list) or not values:
        raise AuthError("a network list must be a non-empty list of CIDR texts")
    networks = []
    for value in values:
        if not isinstance(value, str):
            raise AuthError("a network must be a CIDR text")
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as e:
            raise AuthError(f"bad network {value!r}: {e}") from None
    return tuple(networks)


def address_in(host: str, networks: tuple[Network, ...]) -> bool:
    """Whether the address text ``host`` is in one of ``networks`` (``False`` if it is no address)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _path(value: object, key: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise AuthError(f"{key} must be a file name")
    return value


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise AuthError(f"cannot read {path}: {e.strerror}") from None


def _lines(path: str) -> list[tuple[int, bytes]]:
    """The non-empty, non-comment lines of ``path``, stripped, with their numbers."""
    found = []
    for number, line in enumerate(_read(path).splitlines(), 1):
        line = line.strip()
        if line and not line.startswith(b"#"):
            found.append((number, line))
    return found


def load_tokens(path: str) -> frozenset[bytes]:
    """The bearer tokens of ``path``: one per line."""
    return frozenset(line for _, line in _lines(path))


def load_users(path: str) -> dict[bytes, bytes]:
    """
    The users of the htpasswd file ``path``: ``user:$2y$...`` lines.

    :raises AuthError: for a line that is not a user and a bcrypt hash.
    """
    users = {}
    for number, line in _lines(path):
        user, colon, hashed = line.partition(b":")
        if not colon or not user or _BCRYPT.fullmatch(hashed) is None:
            raise AuthError(f"{path}, line {number}: not user:bcrypt-hash (only bcrypt is accepted)")
        users[user] = hashed
    return users


def load_secret(path: str) -> bytes:
    """The HMAC secret in ``path``, without trailing line ends."""
    secret = _read(path).rstrip(b"\r\n")
    if not secret:
        raise AuthError(f"{path}: the secret is empty")
    return secret


def normalize(spec: object) -> AuthSpec:
    """
    ``spec`` (a route's ``auth`` JSON) checked and with the HMAC defaults
    filled in (``algorithm`` ``sha256``, ``prefix`` empty).

    :raises AuthError: for unknown keys, wrong types or values.
    """
    if not isinstance(spec, dict) or not spec:
        raise AuthError("auth must be a non-empty JSON object")
    unknown = set(spec) - _KEYS
    if unknown:
        raise AuthError(f"unknown auth keys: {', '.join(sorted(unknown))}")
    data: AuthSpec = {}
    for key in ("bearer_tokens_file", "basic_users_file"):
        if key in spec:
            data[key] = _path(spec[key], key)
    if "hmac" in spec:
        rule = spec["hmac"]
        if not isinstance(rule, dict) or set(rule) - _HMAC_KEYS:
            raise AuthError("hmac must be an object of header, secret_file, algorithm, prefix")
        header = rule.get("header")
        if not isinstance(header, str) or not _TOKEN.fullmatch(header):
            raise AuthError("hmac header must be a header name")
        algorithm = rule.get("algorithm", "sha256")
        if not isinstance(algorithm, str) or algorithm.lower() not in hashlib.algorithms_guaranteed:
            raise AuthError(f"hmac algorithm {algorithm!r} is not known")
        if algorithm.lower().startswith("shake"):
            raise AuthError("hmac algorithm must have a fixed digest size")
        prefix = rule.get("prefix", "")
        if not isinstance(prefix, str) or not prefix.isascii():
            raise AuthError("hmac prefix must be ASCII text")
        data["hmac"] = {
            "header": header,
            "secret_file": _path(rule.get("secret_file"), "hmac secret_file"),
            "algorithm": algorithm.lower(),
            "prefix": prefix,
        }
    if "allow" in spec:
        parse_networks(spec["allow"])
        data["allow"] = list(spec["allow"])
    return data


class RouteAuth:
    """
    The checks of one route's ``auth``, with its files loaded.

    :param spec: the route's ``auth`` JSON, as :func:`normalize` gives it.
    :param strict: raise :class:`AuthError` if a file cannot be loaded
        (route creation); otherwise log nothing, refuse every request until a
        :meth:`reload` succeeds (a worker taking a table whose files vanished).
    :raises AuthError: when ``strict`` and a file cannot be loaded.
    """

    def __init__(self, spec: AuthSpec, strict: bool = True) -> None:
        self.spec = spec
        self.networks = parse_networks(spec["allow"]) if "allow" in spec else None
        rule = spec.get("hmac")
        self.hmac_header = rule["header"].encode() if rule else None
        self.hmac_prefix = rule["prefix"].encode() if rule else b""
        self.hmac_algorithm = rule["algorithm"] if rule else ""
        self.tokens: frozenset[bytes] | None = None
        self.users: dict[bytes, bytes] | None = None
        self.secret: bytes | None = None
        self.loaded = False
        try:
            self._load()
        except AuthError:
            if strict:
                raise

    def _load(self) -> None:
        spec = self.spec
        tokens = load_tokens(spec["bearer_tokens_file"]) if "bearer_tokens_file" in spec else None
        users = load_users(spec["basic_users_file"]) if "basic_users_file" in spec else None
        secret = load_secret(spec["hmac"]["secret_file"]) if "hmac" in spec else None
        # all or nothing: a reload never leaves half of the files new
        self.tokens, self.users, self.secret = tokens, users, secret
        self.loaded = True

    def reload(self) -> str | None:
        """Read the files again; on failure keep what was loaded and return why."""
        try:
            self._load()
        except AuthError as e:
            return str(e)
        return None

    def check(
        self,
        remote: str,
        headers: RequestHeaders,
        body: IO[bytes],
        defer_to_thread: Callable[[Callable[[], Verdict]], _Later],
    ) -> Verdict | _Later:
        """
        Check one request.

        :param remote: the client's address (after trusted proxies).
        :param headers: its headers.
        :param body: its buffered body, a seekable binary file.
        :param defer_to_thread: runs a function of no arguments in a thread,
            giving what stands for its result to come (a Deferred), for the
            bcrypt check.
        :return: ``(refusal or None, Basic user or None)``, or what
            ``defer_to_thread`` gave for it.
        """
        if not self.loaded:
            return Refusal(503, None, "the route's auth files could not be loaded"), None
        if self.networks is not None and not address_in(remote, self.networks):
            return Refusal(403, None, f"address {remote} is not allowed"), None
        if self.tokens is not None:
            token = _credentials(headers, b"bearer")
            if token is None or not _one_of(token, self.tokens):
                return Refusal(401, b"Bearer", "no valid bearer token"), None
        if self.secret is not None:
            refusal = self._check_signature(headers, body)
            if refusal is not None:
                return refusal, None
        if self.users is not None:
            return self._check_basic(headers, defer_to_thread)
        return None, None

    def _check_signature(self, headers: RequestHeaders, body: IO[bytes]) -> Refusal | None:
        assert self.hmac_header is not None and self.secret is not None
        values = headers.getRawHeaders(self.hmac_header)
        if not values or len(values) != 1:
            return Refusal(401, None, "no signature header")
        mac = hmac.new(self.secret, digestmod=self.hmac_algorithm)
        body.seek(0)
        while chunk := body.read(65536):
            mac.update(chunk)
        body.seek(0)
        expected = self.hmac_prefix + mac.hexdigest().encode()
        if not hmac.compare_digest(values[0].strip().lower(), expected.lower()):
            return Refusal(401, None, "the signature does not match the body")
        return None

    def _check_basic(
        self, headers: RequestHeaders, defer_to_thread: Callable[[Callable[[], Verdict]], _Later]
    ) -> Verdict | _Later:
        assert self.users is not None
        challenge = b'Basic realm="kapow"'
        encoded = _credentials(headers, b"basic")
        try:
            user, colon, password = base64.b64decode(encoded or b"!", validate=True).partition(b":")
        except (binascii.Error, ValueError):
            colon = b""
        if not colon:
            return Refusal(401, challenge, "no valid Basic credentials"), None
        hashed = self.users.get(user)

        def verdict() -> Verdict:
            if _checkpw(password, hashed or _DUMMY_HASH) and hashed is not None:
                return None, user
            return Refusal(401, challenge, "wrong Basic user or password"), None

        return defer_to_thread(verdict)


def _checkpw(password: bytes, hashed: bytes) -> bool:
    import bcrypt

    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


def _credentials(headers: RequestHeaders, scheme: bytes) -> bytes | None:
    """The credentials of the ``Authorization`` header of ``scheme`` (case-insensitive), if so."""
    values = headers.getRawHeaders(b"authorization")
    if not values or len(values) != 1:
        return None
    given, _, credentials = values[0].strip().partition(b" ")
    if given.lower() != scheme:
        return None
    credentials = credentials.strip()
    return credentials or None


def _one_of(token: bytes, tokens: frozenset[bytes]) -> bool:
    """Whether ``token`` is one of ``tokens``, comparing each in constant time."""
    found = False
    for candidate in tokens:
        found |= hmac.compare_digest(token, candidate)
    return found
