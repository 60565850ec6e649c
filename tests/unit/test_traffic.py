"""Tests for kapow.core.traffic: ``--rate`` parsing, the token buckets and the CORS decisions."""

from __future__ import annotations

import math

import pytest

from kapow.core.traffic import (
    DEFAULT_MAX_AGE,
    MAX_KEYS,
    MAX_PER,
    MAX_REQUESTS,
    CorsPolicy,
    RateLimiter,
    TrafficError,
    normalize_cors,
    normalize_rate,
    origin_key,
    parse_rate,
    preflight,
    response_headers,
    retry_after,
)

# parse_rate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10/s", (10, 1.0)),
        ("100/m", (100, 60.0)),
        ("5/h", (5, 3600.0)),
        ("1000/d", (1000, 86400.0)),
        ("1/30s", (1, 30.0)),
        ("1/5m", (1, 300.0)),
        ("3/2h", (3, 7200.0)),
        ("2/500ms", (2, 0.5)),
        ("1/100ms", (1, 0.1)),
        ("1/1.5h", (1, 5400.0)),
        ("1/0.5s", (1, 0.5)),
        ("1/.5s", (1, 0.5)),
        ("1/1s", (1, 1.0)),
        (" 7/s\n", (7, 1.0)),
        ("010/s", (10, 1.0)),
        (f"{MAX_REQUESTS}/s", (MAX_REQUESTS, 1.0)),
    ],
)
def test_parse_rate(text: str, expected: tuple[int, float]) -> None:
    assert parse_rate(text) == expected
    requests, per = parse_rate(text)
    assert type(requests) is int and type(per) is float


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("0/s", "the number of requests must be from 1 to"),
        (f"{MAX_REQUESTS + 1}/s", "the number of requests must be from 1 to"),
        ("1/0s", "the period must be more than 0 seconds"),
        ("1/0.0m", "the period must be more than 0 seconds"),
        ("1/0ms", "the period must be more than 0 seconds"),
        ("1/99999999999d", f"the period must be at most {MAX_PER} seconds"),
        ("banana", "N/UNIT"),
        ("", "N/UNIT"),
        ("10", "N/UNIT"),
        ("10/", "N/UNIT"),
        ("/s", "N/UNIT"),
        ("1/30", "N/UNIT"),  # a unit is needed
        ("-1/s", "N/UNIT"),
        ("1.5/s", "N/UNIT"),
        ("1/-1s", "N/UNIT"),
        ("1/.s", "N/UNIT"),
        ("1/1e3s", "N/UNIT"),
        ("1/s/s", "N/UNIT"),
        ("10/sec", "N/UNIT"),
        ("10/S", "N/UNIT"),
        ("10 / s", "N/UNIT"),
        ("\u0661/s", "N/UNIT"),  # an Arabic-Indic digit
    ],
)
def test_parse_rate_refuses_with_one_line(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="invalid rate") as caught:
        parse_rate(text)
    message = str(caught.value)
    assert reason in message and repr(text) in message
    assert "\n" not in message


# normalize_rate


def test_normalize_rate_fills_in_the_defaults() -> None:
    assert normalize_rate({"requests": 10, "per": 1}) == {
        "requests": 10,
        "per": 1,
        "burst": 10,
        "key": "client",
    }
    given = {"requests": 1, "per": 0.5, "burst": 5, "key": "route"}
    assert normalize_rate(given) == given
    assert normalize_rate({"requests": 2, "per": 60, "burst": None, "key": None})["burst"] == 2
    assert isinstance(normalize_rate({"requests": 2, "per": 60})["per"], int)  # kept as given


@pytest.mark.parametrize(
    ("rate", "reason"),
    [
        (None, "rate must be a JSON object"),
        ([10, 1], "rate must be a JSON object"),
        ("10/s", "rate must be a JSON object"),
        ({}, "rate requests is missing"),
        ({"per": 1}, "rate requests is missing"),
        ({"requests": 1}, "rate per is missing"),
        ({"requests": 1, "per": 1, "every": 2}, "unknown rate keys: every"),
        ({"requests": 0, "per": 1}, "rate requests must be a whole number from 1 to"),
        ({"requests": -1, "per": 1}, "rate requests must be a whole number"),
        ({"requests": 1.0, "per": 1}, "rate requests must be a whole number"),
        ({"requests": 1.5, "per": 1}, "rate requests must be a whole number"),
        ({"requests": True, "per": 1}, "rate requests must be a whole number"),
        ({"requests": "10", "per": 1}, "rate requests must be a whole number"),
        ({"requests": MAX_REQUESTS + 1, "per": 1}, "rate requests must be a whole number"),
        ({"requests": 1, "per": 0}, "rate per must be a number of seconds > 0"),
        ({"requests": 1, "per": -1}, "rate per must be a number of seconds > 0"),
        ({"requests": 1, "per": math.nan}, "rate per must be a number of seconds > 0"),
        ({"requests": 1, "per": math.inf}, "rate per must be a number of seconds > 0"),
        ({"requests": 1, "per": 10**400}, "rate per must be a number of seconds > 0"),
        ({"requests": 1, "per": MAX_PER + 1}, "rate per must be a number of seconds > 0"),
        ({"requests": 1, "per": True}, "rate per must be a number of seconds"),
        ({"requests": 1, "per": "1s"}, "rate per must be a number of seconds"),
        ({"requests": 1, "per": 1, "burst": 0}, "rate burst must be a whole number from 1 to"),
        ({"requests": 1, "per": 1, "burst": 2.0}, "rate burst must be a whole number"),
        ({"requests": 1, "per": 1, "burst": False}, "rate burst must be a whole number"),
        ({"requests": 1, "per": 1, "key": "ip"}, 'rate key must be "client" or "route"'),
        ({"requests": 1, "per": 1, "key": "Client"}, 'rate key must be "client" or "route"'),
        ({"requests": 1, "per": 1, "key": ["client"]}, 'rate key must be "client" or "route"'),
    ],
)
def test_normalize_rate_refuses(rate: object, reason: str) -> None:
    with pytest.raises(TrafficError, match="^" + reason.replace("(", r"\(")) as caught:
        normalize_rate(rate)
    assert "\n" not in str(caught.value)


# RateLimiter


def test_burst_then_one_token_per_interval() -> None:
    limiter = RateLimiter(1, 30)  # 1/30s, burst 1
    assert limiter.take("a", 1000.0) is None
    assert limiter.take("a", 1000.0) == 30.0
    assert limiter.take("a", 1010.0) == 20.0
    assert limiter.take("a", 1029.5) == 0.5
    assert limiter.take("a", 1030.0) is None
    assert limiter.take("a", 1030.0) == 30.0


def test_burst_of_requests_and_exact_waits() -> None:
    limiter = RateLimiter(10, 1)  # 10/s, burst 10
    for _ in range(10):
        assert limiter.take("a", 0.0) is None
    assert limiter.take("a", 0.0) == 0.1
    assert limiter.take("a", 0.05) == 0.05
    assert limiter.take("a", 0.1) is None  # one token back
    assert limiter.take("a", 0.1) == 0.1
    # a full second refills the whole burst, never more
    for _ in range(10):
        assert limiter.take("a", 5.0) is None
    assert limiter.take("a", 5.0) == 0.1


def test_refused_requests_take_nothing() -> None:
    limiter = RateLimiter(1, 10)
    assert limiter.take("a", 0.0) is None
    for now in (1.0, 2.0, 3.0, 9.0):
        assert limiter.take("a", now) == 10.0 - now
    assert limiter.take("a", 10.0) is None


def test_burst_larger_than_the_rate() -> None:
    limiter = RateLimiter(2, 60, burst=5)  # 2/m: a token every 30 s, up to 5 at once
    assert [limiter.take("a", 0.0) for _ in range(6)] == [None] * 5 + [30.0]
    assert limiter.take("a", 29.0) == 1.0
    assert limiter.take("a", 30.0) is None
    assert limiter.take("a", 30.0) == 30.0
    # after 90 s more, three tokens are back
    assert [limiter.take("a", 120.0) for _ in range(4)] == [None, None, None, 30.0]
    # a long idle time fills the bucket only up to the burst
    assert [limiter.take("a", 10_000.0) for _ in range(6)] == [None] * 5 + [30.0]


def test_burst_smaller_than_the_rate() -> None:
    limiter = RateLimiter(4, 1, burst=1)  # 4/s, one at a time: every 0.25 s
    assert limiter.take("a", 0.0) is None
    assert limiter.take("a", 0.0) == 0.25
    assert limiter.take("a", 0.125) == 0.125
    assert limiter.take("a", 0.25) is None
    assert limiter.take("a", 0.75) is None
    assert limiter.take("a", 0.75) == 0.25


def test_waits_are_exact_for_thirds() -> None:
    limiter = RateLimiter(3, 1, burst=1)
    assert limiter.take("a", 0.0) is None
    assert limiter.take("a", 0.0) == 1 / 3
    assert retry_after(limiter.take("a", 0.0) or 0) == 1


def test_keys_have_their_own_buckets() -> None:
    limiter = RateLimiter(1, 60)
    assert limiter.take("10.0.0.1", 0.0) is None
    assert limiter.take("10.0.0.2", 0.0) is None
    assert limiter.take("10.0.0.1", 1.0) == 59.0
    assert limiter.take("10.0.0.3", 1.0) is None
    assert len(limiter) == 3


def test_large_clock_values() -> None:
    # reactor.seconds() is the Unix time: waits stay exact far from 0
    limiter = RateLimiter(10, 1)
    start = 1_700_000_000.0
    for _ in range(10):
        assert limiter.take("a", start) is None
    assert limiter.take("a", start) == 0.1
    assert limiter.take("a", start + 0.5) is None
    assert limiter.take("a", start + 1.0) is None


def test_a_clock_going_back_never_waits_more_than_one_token() -> None:
    limiter = RateLimiter(1, 10)
    assert limiter.take("a", 1000.0) is None
    assert limiter.take("a", 100.0) == 10.0
    assert limiter.take("a", 105.0) == 5.0
    assert limiter.take("a", 110.0) is None


def test_least_recently_seen_keys_are_forgotten() -> None:
    limiter = RateLimiter(1, 60, max_keys=3)
    for key in ("a", "b", "c"):
        assert limiter.take(key, 0.0) is None
    assert limiter.take("a", 1.0) == 59.0  # a refused request counts as seen: "b" is now the oldest
    assert limiter.take("d", 1.0) is None
    assert len(limiter) == 3
    assert limiter.take("b", 2.0) is None  # forgotten, so its bucket is full again; "c" goes
    assert limiter.take("a", 2.0) == 58.0
    assert limiter.take("d", 2.0) == 59.0
    assert limiter.take("c", 3.0) is None
    assert len(limiter) == 3


def test_default_max_keys() -> None:
    assert MAX_KEYS == 100_000
    limiter = RateLimiter(1, 1)
    assert limiter.max_keys == MAX_KEYS
    for n in range(MAX_KEYS + 5):
        limiter.take(n, 0.0)
    assert len(limiter) == MAX_KEYS
    assert limiter.take(MAX_KEYS + 4, 0.0) == 1.0  # remembered
    assert limiter.take(0, 0.0) is None  # forgotten


def test_from_spec() -> None:
    limiter = RateLimiter.from_spec({"requests": 5, "per": 60})
    assert (limiter.requests, limiter.per, limiter.burst, limiter.key) == (5, 60.0, 5, "client")
    limiter = RateLimiter.from_spec({"requests": 5, "per": 60, "burst": 1, "key": "route"}, max_keys=7)
    assert (limiter.burst, limiter.key, limiter.max_keys) == (1, "route", 7)
    with pytest.raises(TrafficError, match="rate requests must be"):
        RateLimiter.from_spec({"requests": 0, "per": 60})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"requests": 0, "per": 1},
        {"requests": 1, "per": 0},
        {"requests": 1, "per": 1, "burst": 0},
        {"requests": 1, "per": 1, "key": "ip"},
        {"requests": 1, "per": 1, "max_keys": 0},
        {"requests": True, "per": 1},
    ],
)
def test_limiter_refuses_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RateLimiter(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("wait", "seconds"), [(0.001, 1), (0.5, 1), (1.0, 1), (1.0000001, 2), (20.0, 20), (29.5, 30), (1 / 3, 1)]
)
def test_retry_after_rounds_up(wait: float, seconds: int) -> None:
    assert retry_after(wait) == seconds


# origin_key


@pytest.mark.parametrize(
    ("origin", "key"),
    [
        ("https://a.example", ("https", "a.example", 443)),
        ("HTTPS://A.Example", ("https", "a.example", 443)),
        ("https://a.example:443", ("https", "a.example", 443)),
        ("http://a.example", ("http", "a.example", 80)),
        ("http://a.example:8080", ("http", "a.example", 8080)),
        ("http://[::1]:8080", ("http", "::1", 8080)),
        ("http://127.0.0.1", ("http", "127.0.0.1", 80)),
    ],
)
def test_origin_key_strict(origin: str, key: tuple[str, str, int]) -> None:
    assert origin_key(origin, strict=True) == key
    assert origin_key(origin) == key


@pytest.mark.parametrize(
    "origin",
    [
        "https://a.example/",
        "wss://a.example",
        "ws://a.example",
        "https://*.example",
        "https://bücher.example",
    ],
)
def test_origin_key_strict_refuses_what_websocket_origins_take(origin: str) -> None:
    assert origin_key(origin, strict=True) is None


@pytest.mark.parametrize(
    "origin",
    [
        "null",
        "*",
        "",
        "a.example",
        "//a.example",
        "ftp://a.example",
        "https://",
        "https://a.example?x=1",
        "https://a.example#f",
        "https://user@a.example",
        "https://user:pw@a.example",
        "https://a.example:port",
        "https://a.example:70000",
        "https://a .example",
        "https://a.example\r\nX: y",
        "https://[::1",
    ],
)
def test_origin_key_refuses(origin: str) -> None:
    assert origin_key(origin, strict=True) is None
    assert origin_key(origin) is None


# normalize_cors


def test_normalize_cors_fills_in_the_defaults() -> None:
    assert normalize_cors({"origins": ["https://a.example"]}) == {
        "origins": ["https://a.example"],
        "headers": [],
        "max_age": DEFAULT_MAX_AGE,
        "credentials": False,
    }
    assert DEFAULT_MAX_AGE == 600
    given = {
        "origins": ["https://a.example", "http://b.example:8080"],
        "headers": ["Content-Type", "X-Token"],
        "max_age": 0,
        "credentials": True,
    }
    assert normalize_cors(given) == given
    assert normalize_cors({"origins": ["*"]})["origins"] == ["*"]
    nulls = {"origins": ("https://a.example",), "headers": None, "max_age": None, "credentials": None}
    assert normalize_cors(nulls) == normalize_cors({"origins": ["https://a.example"]})


@pytest.mark.parametrize(
    ("cors", "reason"),
    [
        (None, "cors must be a JSON object"),
        (["https://a.example"], "cors must be a JSON object"),
        ({}, "cors origins is missing"),
        ({"origins": None}, "cors origins is missing"),
        ({"origins": []}, "cors origins must be a non-empty list of strings"),
        ({"origins": "https://a.example"}, "cors origins must be a non-empty list of strings"),
        ({"origins": [1]}, "cors origins must be a non-empty list of strings"),
        ({"origins": {"https://a.example": 1}}, "cors origins must be a non-empty list of strings"),
        ({"origins": ["https://a.example"], "methods": ["GET"]}, "unknown cors keys: methods"),
        ({"origins": ["a.example"]}, "cors origin 'a.example' is not '*' or scheme://host[:port]"),
        ({"origins": ["null"]}, "cors origin 'null' is not"),
        ({"origins": [""]}, "cors origin '' is not"),
        ({"origins": ["https://a.example/"]}, "cors origin 'https://a.example/' is not"),
        ({"origins": ["https://a.example/app"]}, "cors origin 'https://a.example/app' is not"),
        ({"origins": ["https://a.example?x"]}, "cors origin 'https://a.example?x' is not"),
        ({"origins": ["https://a.example#x"]}, "cors origin 'https://a.example#x' is not"),
        ({"origins": ["https://u@a.example"]}, "cors origin 'https://u@a.example' is not"),
        ({"origins": ["wss://a.example"]}, "cors origin 'wss://a.example' is not"),
        ({"origins": ["ftp://a.example"]}, "cors origin 'ftp://a.example' is not"),
        ({"origins": ["https://*.example"]}, "cors origin 'https://*.example' is not"),
        ({"origins": ["https://bücher.example"]}, "cors origin 'https://bücher.example' is not"),
        ({"origins": ["https://a..example"]}, "cors origin 'https://a..example' is not"),
        ({"origins": ["*", "https://a.example"]}, "cors origins: '*' must be the only one"),
        ({"origins": ["*"], "credentials": True}, "cors credentials cannot be true with origins"),
        ({"origins": ["*"], "headers": "X-A"}, "cors headers must be a list of header names"),
        ({"origins": ["*"], "headers": [1]}, "cors headers must be a list of header names"),
        ({"origins": ["*"], "headers": ["X A"]}, "cors header 'X A' is not a header name"),
        ({"origins": ["*"], "headers": ["X-A:"]}, "cors header 'X-A:' is not a header name"),
        ({"origins": ["*"], "headers": [""]}, "cors header '' is not a header name"),
        ({"origins": ["*"], "max_age": -1}, "cors max_age must be a whole number of seconds from 0 to"),
        ({"origins": ["*"], "max_age": 1.5}, "cors max_age must be a whole number"),
        ({"origins": ["*"], "max_age": 600.0}, "cors max_age must be a whole number"),
        ({"origins": ["*"], "max_age": True}, "cors max_age must be a whole number"),
        ({"origins": ["*"], "max_age": "600"}, "cors max_age must be a whole number"),
        ({"origins": ["*"], "max_age": 2**31}, "cors max_age must be a whole number"),
        ({"origins": ["*"], "credentials": 1}, "cors credentials must be true or false"),
        ({"origins": ["*"], "credentials": "false"}, "cors credentials must be true or false"),
    ],
)
def test_normalize_cors_refuses(cors: object, reason: str) -> None:
    with pytest.raises(TrafficError) as caught:
        normalize_cors(cors)
    message = str(caught.value)
    assert message.startswith(reason)
    assert "\n" not in message


# CORS decisions

LISTED = {"origins": ["https://a.example", "http://b.example:8080"], "headers": ["Content-Type", "X-Token"]}


def test_preflight_from_a_listed_origin() -> None:
    status, headers = preflight(LISTED, "https://a.example", "POST", "POST", "content-type,x-token")
    assert status == 204
    assert headers == [
        ("Access-Control-Allow-Origin", "https://a.example"),
        ("Access-Control-Allow-Methods", "POST"),
        ("Access-Control-Allow-Headers", "Content-Type, X-Token"),
        ("Access-Control-Max-Age", "600"),
        ("Vary", "Origin"),
    ]


def test_preflight_echoes_the_origin_as_sent() -> None:
    # an origin matches in any case and with its default port, and is echoed as the browser sent it
    for origin in ("https://A.EXAMPLE", "https://a.example:443", "HTTP://b.example:8080"):
        status, headers = preflight(LISTED, origin, "GET", "GET", None)
        assert status == 204
        assert headers[0] == ("Access-Control-Allow-Origin", origin)


@pytest.mark.parametrize(
    "origin",
    [
        "https://c.example",
        "http://a.example",  # another scheme
        "https://a.example:8443",  # another port
        "http://b.example",  # the default port is not 8080
        "https://a.example.evil",
        "https://evil.a.example",
        "https://a.example/",
        "null",
        "",
        "*",
        "https://a.example\r\nX-Evil: 1",
    ],
)
def test_preflight_from_another_origin_is_403_without_cors_headers(origin: str) -> None:
    assert preflight(LISTED, origin, "GET", "GET", "x-token") == (403, [])
    assert response_headers(LISTED, origin) == []


def test_preflight_for_another_method_is_refused() -> None:
    assert preflight(LISTED, "https://a.example", "DELETE", "POST", None) == (403, [])
    assert preflight(LISTED, "https://a.example", "post", "POST", None) == (
        403,
        [],
    )  # methods are case-sensitive


@pytest.mark.parametrize(
    ("requested", "allowed"),
    [
        (None, None),
        ("", None),
        ("x-other", None),
        ("x-token", "X-Token"),
        ("X-TOKEN", "X-Token"),
        ("x-other, x-token", "X-Token"),
        (" x-token , content-type ", "X-Token, Content-Type"),
        ("x-token,x-token,X-Token", "X-Token"),
        ("content-type,,x-token,", "Content-Type, X-Token"),
    ],
)
def test_preflight_allows_the_requested_headers_that_are_listed(
    requested: str | None, allowed: str | None
) -> None:
    status, headers = preflight(LISTED, "https://a.example", "PUT", "PUT", requested)
    assert status == 204
    found = [value for name, value in headers if name == "Access-Control-Allow-Headers"]
    assert found == ([] if allowed is None else [allowed])


def test_preflight_without_listed_headers_allows_none() -> None:
    status, headers = preflight({"origins": ["*"]}, "https://x.example", "GET", "GET", "x-token")
    assert status == 204
    assert "Access-Control-Allow-Headers" not in dict(headers)


def test_preflight_for_any_origin() -> None:
    cors = {"origins": ["*"], "max_age": 0}
    for origin in ("https://x.example", "null", "anything"):
        status, headers = preflight(cors, origin, "GET", "GET", None)
        assert status == 204
        assert headers == [
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Methods", "GET"),
            ("Access-Control-Max-Age", "0"),
            ("Vary", "Origin"),
        ]
        assert response_headers(cors, origin) == [("Access-Control-Allow-Origin", "*"), ("Vary", "Origin")]


def test_credentials() -> None:
    cors = {**LISTED, "credentials": True, "max_age": 86400}
    status, headers = preflight(cors, "https://a.example", "GET", "GET", None)
    assert status == 204
    assert headers == [
        ("Access-Control-Allow-Origin", "https://a.example"),
        ("Access-Control-Allow-Credentials", "true"),
        ("Access-Control-Allow-Methods", "GET"),
        ("Access-Control-Max-Age", "86400"),
        ("Vary", "Origin"),
    ]
    assert response_headers(cors, "https://a.example") == [
        ("Access-Control-Allow-Origin", "https://a.example"),
        ("Access-Control-Allow-Credentials", "true"),
        ("Vary", "Origin"),
    ]
    assert preflight(cors, "https://c.example", "GET", "GET", None) == (403, [])
    assert response_headers(cors, "https://c.example") == []


def test_response_headers() -> None:
    assert response_headers(LISTED, "https://a.example") == [
        ("Access-Control-Allow-Origin", "https://a.example"),
        ("Vary", "Origin"),
    ]
    assert response_headers(LISTED, "http://B.example:8080") == [
        ("Access-Control-Allow-Origin", "http://B.example:8080"),
        ("Vary", "Origin"),
    ]
    assert response_headers(LISTED, None) == []
    assert response_headers({"origins": ["*"]}, None) == []


def test_policy_object() -> None:
    policy = CorsPolicy(
        {"origins": ["https://A.example:443", "http://[::1]:8080"], "headers": ["X-A", "x-a"]}
    )
    assert policy.spec == {
        "origins": ["https://A.example:443", "http://[::1]:8080"],
        "headers": ["X-A", "x-a"],
        "max_age": 600,
        "credentials": False,
    }
    assert policy.allows("https://a.example")
    assert policy.allows("http://[::1]:8080")
    assert not policy.allows("http://[::1]")
    assert policy.preflight("https://a.example", "GET", "GET", "x-a")[1][2] == (
        "Access-Control-Allow-Headers",
        "X-A",
    )
    # the module functions take a policy as well as a spec
    assert preflight(policy, "https://a.example", "GET", "GET", None) == policy.preflight(
        "https://a.example", "GET", "GET", None
    )
    assert response_headers(policy, "https://a.example") == policy.response_headers("https://a.example")
    with pytest.raises(TrafficError):
        CorsPolicy({"origins": []})


def test_returned_lists_are_fresh() -> None:
    policy = CorsPolicy({"origins": ["*"]})
    first = policy.response_headers("https://a.example")
    first.append(("X", "y"))
    assert policy.response_headers("https://a.example") == [
        ("Access-Control-Allow-Origin", "*"),
        ("Vary", "Origin"),
    ]
