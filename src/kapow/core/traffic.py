"""
Traffic policy of a route (SPEC section 13): its ``rate`` (a token bucket
per client or per route; a request that finds no token gets ``429``) and its
``cors`` (the server answers a preflight itself and adds the CORS headers to
the other responses).

What is here is pure: the route fields checked and with their defaults
filled in (:func:`normalize_rate`, :func:`normalize_cors`; the route wraps a
:class:`TrafficError` into ``Invalid Route``), ``--rate N/UNIT`` parsed
(:func:`parse_rate`), the buckets (:class:`RateLimiter`, which is given the
time instead of reading a clock) and the CORS decisions over plain values
(:class:`CorsPolicy`, :func:`preflight`, :func:`response_headers`). Whoever
serves requests keeps one :class:`RateLimiter` per rated route and asks
:attr:`kapow.core.routes.Route.cors_policy` for the CORS one.

Standard library only, and nothing that ``kapow route add`` does not load
anyway (no :mod:`typing`, no :mod:`urllib` until an origin is parsed):
``kapow route add --rate`` parses with it.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping

# typing.TYPE_CHECKING without importing typing; type checkers know the name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypedDict

    class RateSpec(TypedDict):
        """A route's ``rate``, as :func:`normalize_rate` gives it."""

        requests: int
        per: float
        burst: int
        key: str

    class CorsSpec(TypedDict):
        """A route's ``cors``, as :func:`normalize_cors` gives it."""

        origins: list[str]
        headers: list[str]
        max_age: int
        credentials: bool


__all__ = [
    "DEFAULT_MAX_AGE",
    "MAX_KEYS",
    "RATE_KEYS",
    "CorsPolicy",
    "RateLimiter",
    "TrafficError",
    "normalize_cors",
    "normalize_rate",
    "origin_key",
    "parse_rate",
    "preflight",
    "response_headers",
    "retry_after",
]

#: The values of a rate's ``key``: a bucket per client address, or one for the whole route.
RATE_KEYS = ("client", "route")

#: The largest ``requests`` and ``burst`` of a rate: more is taken for a mistake.
MAX_REQUESTS = 1_000_000

#: The longest ``per`` of a rate, in seconds (about 31 years): more is taken for a mistake.
MAX_PER = 1_000_000_000

#: How many keys (client addresses) a route's limiter remembers at most.
MAX_KEYS = 100_000

#: Seconds a browser may keep a preflight's answer when ``cors`` sets no ``max_age``.
DEFAULT_MAX_AGE = 600

#: The largest ``max_age`` (2**31 - 1 seconds).
MAX_MAX_AGE = 2**31 - 1

_RATE_FIELDS = ("requests", "per", "burst", "key")
_CORS_FIELDS = ("origins", "headers", "max_age", "credentials")

# RFC 9110 section 5.6.2: token = 1*tchar
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# N/UNIT, UNIT a unit or a number of them: 10/s, 1/30s, 2/500ms, 1/1.5h
_RATE = re.compile(r"([0-9]+)/([0-9]*\.?[0-9]*)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE_FORM = "N/UNIT: a whole number of requests per s, m, h or d, or per a number of them: 10/s, 100/m, 5/h, 1/30s, 2/500ms"

#: The schemes an origin may have, with their default ports; CORS takes only the first two.
_ORIGIN_SCHEMES = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_WEB_SCHEMES = ("http", "https")

# spaces, control characters, and the starts of a query or a fragment
_NOT_IN_ORIGIN = re.compile(r"[\x00- \x7f?#]")

# the host of a strict origin: a DNS name or an IPv4 address, or an IPv6 address (in brackets in the URL)
_HOST = re.compile(r"[a-z0-9_\-]+(?:\.[a-z0-9_\-]+)*\.?|[0-9a-f:.]*:[0-9a-f:.]*")


class TrafficError(ValueError):
    """A route's ``rate`` or ``cors`` is refused; the message says why, in one line."""


def origin_key(origin: str, *, strict: bool = False) -> tuple[str, str, int] | None:
    """
    ``origin`` as (scheme, host, port), lower-cased and with the scheme's
    default port filled in, if it is an absolute http, https, ws or wss URL
    with a host, no user information, no path beyond ``/``, no query and no
    fragment; else ``None``.

    :param strict: the form of an ``Origin`` header and of a CORS origin:
        http or https only, no path at all (not even ``/``), and a host that
        is a DNS name (ASCII: what browsers send), an IPv4 or an IPv6 address.
    """
    if _NOT_IN_ORIGIN.search(origin) is not None:
        return None
    from urllib.parse import urlsplit  # here: ``kapow route add`` loads this module, never urllib

    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if (
        scheme not in (_WEB_SCHEMES if strict else _ORIGIN_SCHEMES)
        or not parts.hostname
        or "@" in parts.netloc
        or parts.path not in (("",) if strict else ("", "/"))
        or (strict and not _HOST.fullmatch(parts.hostname))
    ):
        return None
    return scheme, parts.hostname, _ORIGIN_SCHEMES[scheme] if port is None else port


def _serialized(key: tuple[str, str, int]) -> str:
    """The origin of ``key`` as a browser sends it: ``https://a.example``, ``http://[::1]:8080``."""
    scheme, host, port = key
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" if port == _ORIGIN_SCHEMES[scheme] else f"{scheme}://{host}:{port}"


def _whole(value: object, low: int, high: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high


def _seconds(value: object, name: str) -> float:
    """``value`` checked: a finite number of seconds > 0 and at most :data:`MAX_PER`, not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrafficError(f"{name} must be a number of seconds")
    try:
        as_float = float(value)
    except OverflowError:
        as_float = math.inf
    if not 0 < as_float <= MAX_PER:  # NaN fails too
        raise TrafficError(f"{name} must be a number of seconds > 0 and at most {MAX_PER}")
    return as_float


def _object(spec: object, name: str, known: tuple[str, ...]) -> Mapping[str, object]:
    if not isinstance(spec, Mapping):
        raise TrafficError(f"{name} must be a JSON object")
    unknown = sorted(str(key) for key in spec if key not in known)
    if unknown:
        raise TrafficError(f"unknown {name} keys: {', '.join(unknown)} (known: {', '.join(known)})")
    return spec


def normalize_rate(spec: object) -> RateSpec:
    """
    ``spec`` (a route's ``rate`` JSON) checked and with the defaults filled
    in: ``requests`` a whole number from 1 to :data:`MAX_REQUESTS`, ``per``
    seconds > 0 (kept as given, a whole number stays one), ``burst`` like
    ``requests`` (default: ``requests``), ``key`` one of :data:`RATE_KEYS`
    (default ``"client"``). A ``null`` ``burst`` or ``key`` counts as absent.

    :raises TrafficError: for unknown keys, missing ones, wrong types or values.
    """
    data = _object(spec, "rate", _RATE_FIELDS)
    requests = data.get("requests")
    if requests is None:
        raise TrafficError("rate requests is missing")
    if not _whole(requests, 1, MAX_REQUESTS):
        raise TrafficError(f"rate requests must be a whole number from 1 to {MAX_REQUESTS}")
    assert isinstance(requests, int)
    per = data.get("per")
    if per is None:
        raise TrafficError("rate per is missing")
    _seconds(per, "rate per")
    assert isinstance(per, (int, float))
    burst = data.get("burst")
    if burst is None:
        burst = requests
    elif not _whole(burst, 1, MAX_REQUESTS):
        raise TrafficError(f"rate burst must be a whole number from 1 to {MAX_REQUESTS}")
    assert isinstance(burst, int)
    key = data.get("key")
    if key is None:
        key = "client"
    elif not isinstance(key, str) or key not in RATE_KEYS:
        raise TrafficError('rate key must be "client" or "route"')
    return {"requests": requests, "per": per, "burst": burst, "key": key}


def normalize_cors(spec: object) -> CorsSpec:
    """
    ``spec`` (a route's ``cors`` JSON) checked and with the defaults filled
    in: ``origins`` a non-empty list of ``"*"`` alone or of origins
    ``scheme://host[:port]`` (http or https; no path, query, fragment or user
    information), ``headers`` a list of header names (default empty),
    ``max_age`` whole seconds from 0 to 2**31 - 1 (default
    :data:`DEFAULT_MAX_AGE`), ``credentials`` true or false (default false;
    not true with ``["*"]``). A ``null`` optional key counts as absent.

    :raises TrafficError: for unknown keys, a missing ``origins``, wrong types or values.
    """
    data = _object(spec, "cors", _CORS_FIELDS)
    origins = data.get("origins")
    if origins is None:
        raise TrafficError("cors origins is missing")
    if not isinstance(origins, (list, tuple)) or not origins or not all(isinstance(o, str) for o in origins):
        raise TrafficError("cors origins must be a non-empty list of strings")
    for origin in origins:
        if origin != "*" and origin_key(origin, strict=True) is None:
            raise TrafficError(
                f"cors origin {origin!r} is not '*' or scheme://host[:port] "
                "(http or https; no path, query, fragment or user information)"
            )
    if "*" in origins and len(origins) > 1:
        raise TrafficError("cors origins: '*' must be the only one")
    headers = data.get("headers")
    if headers is None:
        headers = []
    if not isinstance(headers, (list, tuple)) or not all(isinstance(h, str) for h in headers):
        raise TrafficError("cors headers must be a list of header names")
    for header in headers:
        if not _TOKEN.fullmatch(header):
            raise TrafficError(f"cors header {header!r} is not a header name (an HTTP token)")
    max_age = data.get("max_age")
    if max_age is None:
        max_age = DEFAULT_MAX_AGE
    elif not _whole(max_age, 0, MAX_MAX_AGE):
        raise TrafficError(f"cors max_age must be a whole number of seconds from 0 to {MAX_MAX_AGE}")
    assert isinstance(max_age, int)
    credentials = data.get("credentials")
    if credentials is None:
        credentials = False
    elif not isinstance(credentials, bool):
        raise TrafficError("cors credentials must be true or false")
    if credentials and list(origins) == ["*"]:
        raise TrafficError('cors credentials cannot be true with origins ["*"]: list the origins')
    return {
        "origins": list(origins),
        "headers": list(headers),
        "max_age": max_age,
        "credentials": credentials,
    }


def parse_rate(text: str) -> tuple[int, float]:
    """
    ``--rate N/UNIT``: ``10/s``, ``100/m``, ``5/h``, ``1/30s``, ``2/500ms``,
    ``1/1.5h`` (units ``ms``, ``s``, ``m``, ``h``, ``d``, each after an
    optional number of them).

    :return: (requests, seconds): ``(1, 30.0)`` for ``1/30s``.
    :raises ValueError: with a one-line message, if it is not of that form,
        the number of requests is not from 1 to :data:`MAX_REQUESTS`, or
        the period is not more than 0 seconds (nor at most :data:`MAX_PER`).
    """
    found = _RATE.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"invalid rate {text!r} ({_RATE_FORM})")
    count, number, unit = found.groups()
    try:
        amount = float(number) if number else 1.0
    except ValueError:  # a lone "."
        raise ValueError(f"invalid rate {text!r} ({_RATE_FORM})") from None
    requests = int(count)
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"invalid rate {text!r}: the number of requests must be from 1 to {MAX_REQUESTS}")
    per = amount / 1000 if unit == "ms" else amount * _UNITS[unit]
    if per <= 0:
        raise ValueError(f"invalid rate {text!r}: the period must be more than 0 seconds")
    if per > MAX_PER:
        raise ValueError(f"invalid rate {text!r}: the period must be at most {MAX_PER} seconds")
    return requests, per


def retry_after(wait: float) -> int:
    """The ``Retry-After`` value for a wait of :meth:`RateLimiter.take`: whole seconds, rounded up."""
    return max(1, math.ceil(wait))


class RateLimiter:
    """
    The token buckets of one rated route: a bucket per key (a client address,
    or one key for the whole route), each holding up to ``burst`` tokens and
    refilled with ``requests`` tokens every ``per`` seconds; a request takes
    one. At most ``max_keys`` keys are remembered: using one more forgets the
    least recently seen, whose bucket is full again if it comes back.

    Each bucket is one number, the time its debt is paid (the "theoretical
    arrival time" of the generic cell rate algorithm), counted in seconds
    times ``requests`` since the first call, so one token costs exactly
    ``per`` and a wait is one division away from exact. O(1) per call.
    Nothing here reads a clock: each call is given the time (Twisted's
    ``reactor.seconds()``, or any clock that goes forward; a clock that goes
    back never makes a wait longer than one token's time).

    :param requests: tokens per ``per`` (>= 1).
    :param per: seconds (> 0).
    :param burst: the bucket's size (>= 1; ``None``: ``requests``).
    :param key: ``"client"`` or ``"route"``: what the caller keys the buckets
        by (kept here for it; :meth:`take` takes any key).
    :param max_keys: how many keys are remembered at most (>= 1).
    :raises ValueError: for values out of those ranges.
    """

    __slots__ = (
        "_buckets",
        "_cost",
        "_epoch",
        "_full",
        "_limit",
        "burst",
        "key",
        "max_keys",
        "per",
        "requests",
    )

    def __init__(
        self,
        requests: int,
        per: float,
        burst: int | None = None,
        key: str = "client",
        max_keys: int = MAX_KEYS,
    ) -> None:
        if burst is None:
            burst = requests
        if not (_whole(requests, 1, MAX_REQUESTS) and _whole(burst, 1, MAX_REQUESTS)):
            raise ValueError(f"requests and burst must be whole numbers from 1 to {MAX_REQUESTS}")
        if not _whole(max_keys, 1, 2**62):
            raise ValueError("max_keys must be a whole number >= 1")
        if key not in RATE_KEYS:
            raise ValueError('key must be "client" or "route"')
        self.requests = requests
        self.per = _seconds(per, "per")
        self.burst = burst
        self.key = key
        self.max_keys = max_keys
        # In units of seconds * requests: a token costs per, a bucket may
        # owe (burst - 1) * per before a take and burst * per after one.
        self._cost = self.per
        self._limit = (burst - 1) * self.per
        self._full = burst * self.per
        self._epoch: float | None = None
        self._buckets: OrderedDict[object, float] = OrderedDict()

    @classmethod
    def from_spec(cls, rate: Mapping[str, object], max_keys: int = MAX_KEYS) -> RateLimiter:
        """The limiter of a route's ``rate`` (checked by :func:`normalize_rate` first).

        :raises TrafficError: if ``rate`` is not a valid rate.
        """
        spec = normalize_rate(rate)
        return cls(spec["requests"], spec["per"], spec["burst"], spec["key"], max_keys)

    def take(self, key: object, now: float) -> float | None:
        """
        Take a token from ``key``'s bucket at time ``now``.

        :param key: the bucket: the client address for a ``"client"`` rate,
            any constant (``""``) for a ``"route"`` one; any hashable value.
        :param now: the time in seconds, from a clock that goes forward.
        :return: ``None`` if a token was taken (serve the request); else the
            exact seconds until the next token (> 0; nothing was taken):
            answer 429 with ``Retry-After`` rounded up (:func:`retry_after`).
        """
        epoch = self._epoch
        if epoch is None:
            epoch = self._epoch = now
        now = (now - epoch) * self.requests
        buckets = self._buckets
        paid = buckets.get(key)
        if paid is None:
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
            paid = now
        else:
            buckets.move_to_end(key)
            if paid < now:
                paid = now
        owed = paid - now
        if owed <= self._limit:
            buckets[key] = paid + self._cost
            return None
        if owed > self._full:  # the clock went back: owe no more than a full bucket
            owed = self._full
            buckets[key] = now + owed
        return (owed - self._limit) / self.requests

    def __len__(self) -> int:
        """How many keys are remembered now."""
        return len(self._buckets)

    def __repr__(self) -> str:
        return f"<RateLimiter {self.requests}/{self.per}s burst {self.burst} by {self.key}, {len(self)} keys>"


class CorsPolicy:
    """
    The CORS decisions of one route's ``cors``, made once when the route is.

    :param spec: the route's ``cors`` JSON (checked by :func:`normalize_cors`).
    :raises TrafficError: if ``spec`` is not a valid ``cors``.
    :ivar spec: ``spec`` with its defaults filled in.
    """

    __slots__ = ("_any", "_exact", "_headers", "_keys", "credentials", "max_age", "spec")

    def __init__(self, spec: Mapping[str, object]) -> None:
        checked = normalize_cors(spec)
        self.spec = checked
        self.credentials = checked["credentials"]
        self.max_age = str(checked["max_age"])
        self._any = checked["origins"] == ["*"]
        keys = {key for key in map(_strict_key, checked["origins"]) if key is not None}
        self._keys = frozenset(keys)
        # what browsers send (lower case, no default port) matches without parsing
        self._exact = frozenset(map(_serialized, keys))
        # lower-cased name -> the name as listed
        self._headers = {name.lower(): name for name in reversed(checked["headers"])}

    def allows(self, origin: str) -> bool:
        """
        Whether an ``Origin`` header's value is allowed: anything with
        ``["*"]``; else one of the origins, scheme and host compared without
        regard to case and an absent port being the scheme's default
        (``https://A.example:443`` is ``https://a.example``).
        """
        if self._any or origin in self._exact:
            return True
        key = _strict_key(origin)
        return key is not None and key in self._keys

    def _allow_origin(self, origin: str) -> list[tuple[str, str]]:
        value = "*" if self._any and not self.credentials else origin
        headers = [("Access-Control-Allow-Origin", value)]
        if self.credentials:
            headers.append(("Access-Control-Allow-Credentials", "true"))
        return headers

    def preflight(
        self, origin: str, requested_method: str, route_method: str, requested_headers: str | None
    ) -> tuple[int, list[tuple[str, str]]]:
        """
        The answer to a preflight: ``OPTIONS`` with ``Origin: origin`` and
        ``Access-Control-Request-Method: requested_method``, to a path this
        route matches.

        :param route_method: the route's method; a requested method that is
            not it (compared exactly, as methods are) is refused.
        :param requested_headers: the ``Access-Control-Request-Headers``
            value (comma-separated names), or ``None``.
        :return: ``(204, headers)``: ``Access-Control-Allow-Origin`` (the
            origin, or ``*`` for ``["*"]`` without credentials),
            ``Access-Control-Allow-Credentials: true`` if set,
            ``Access-Control-Allow-Methods`` (the route's method),
            ``Access-Control-Allow-Headers`` (those requested that are
            listed, as listed; left out when none), ``Access-Control-Max-Age``
            and ``Vary: Origin``; or ``(403, [])`` for an origin that is not
            allowed or another method.
        """
        if requested_method != route_method or not self.allows(origin):
            return 403, []
        headers = self._allow_origin(origin)
        headers.append(("Access-Control-Allow-Methods", route_method))
        if requested_headers and self._headers:
            allowed: dict[str, None] = {}
            for name in requested_headers.split(","):
                listed = self._headers.get(name.strip().lower())
                if listed is not None:
                    allowed[listed] = None
            if allowed:
                headers.append(("Access-Control-Allow-Headers", ", ".join(allowed)))
        headers.append(("Access-Control-Max-Age", self.max_age))
        headers.append(("Vary", "Origin"))
        return 204, headers

    def response_headers(self, origin: str | None) -> list[tuple[str, str]]:
        """
        The headers to add to the response of a request (not a preflight)
        with ``Origin: origin`` (``None``: it had none):
        ``Access-Control-Allow-Origin``, ``Access-Control-Allow-Credentials:
        true`` if set, and ``Vary: Origin``, for an allowed origin; nothing
        otherwise.
        """
        if origin is None or not self.allows(origin):
            return []
        headers = self._allow_origin(origin)
        headers.append(("Vary", "Origin"))
        return headers

    def __repr__(self) -> str:
        return f"<CorsPolicy {self.spec!r}>"


def _strict_key(origin: str) -> tuple[str, str, int] | None:
    return None if origin == "*" else origin_key(origin, strict=True)


def _policy(cors: CorsPolicy | Mapping[str, object]) -> CorsPolicy:
    return cors if isinstance(cors, CorsPolicy) else CorsPolicy(cors)


def preflight(
    cors: CorsPolicy | Mapping[str, object],
    origin: str,
    requested_method: str,
    route_method: str,
    requested_headers: str | None,
) -> tuple[int, list[tuple[str, str]]]:
    """:meth:`CorsPolicy.preflight` of ``cors`` (a policy, or a ``cors`` spec made into one)."""
    return _policy(cors).preflight(origin, requested_method, route_method, requested_headers)


def response_headers(cors: CorsPolicy | Mapping[str, object], origin: str | None) -> list[tuple[str, str]]:
    """:meth:`CorsPolicy.response_headers` of ``cors`` (a policy, or a ``cors`` spec made into one)."""
    return _policy(cors).response_headers(origin)
