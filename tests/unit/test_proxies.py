"""
The client's address behind trusted proxies (kapow.user.proxies), and the
options that turn it and the PROXY protocol on.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.python import usage
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from kapow.server.options import Options, parse_listen_address
from kapow.user.proxies import TrustedProxies, parse_trusted_proxies

PROXIES = TrustedProxies(parse_trusted_proxies("10.0.0.0/8, 192.168.1.1,fd00::/8"))


def client(peer: str, **headers: str) -> str | None:
    return PROXIES.client(peer, Headers({k.replace("_", "-"): [v] for k, v in headers.items()}))


def test_the_rightmost_untrusted_forwarded_address_is_the_client() -> None:
    assert client("10.1.1.1", x_forwarded_for="203.0.113.7") == "203.0.113.7"
    assert client("10.1.1.1", x_forwarded_for="6.6.6.6, 203.0.113.7, 10.2.2.2") == "203.0.113.7"
    assert client("fd00::5", x_forwarded_for="2001:db8::1") == "2001:db8::1"
    assert client("10.1.1.1", x_forwarded_for="[2001:db8::1]:4711, 203.0.113.7:80") == "203.0.113.7"
    # every hop trusted: the farthest one
    assert client("10.1.1.1", x_forwarded_for="10.9.9.9, 192.168.1.1") == "10.9.9.9"


def test_forwarded_for_counts_without_x_forwarded_for() -> None:
    assert client("10.1.1.1", forwarded='for=198.51.100.17;proto=https, for="[2001:db8:cafe::17]:4711"') == (
        "2001:db8:cafe::17"
    )
    assert client("10.1.1.1", forwarded="For=198.51.100.17;by=10.1.1.1") == "198.51.100.17"
    assert client("10.1.1.1", forwarded="proto=https") is None
    assert client("10.1.1.1", x_forwarded_for="203.0.113.7", forwarded="for=198.51.100.17") == "203.0.113.7"


@pytest.mark.parametrize(
    "value",
    ["garbage", "203.0.113.7, garbage", "", " , ", "999.1.1.1", "unknown", "\xff\xfe", "_hidden"],
)
def test_garbage_from_a_trusted_proxy_leaves_the_peer(value: str) -> None:
    assert client("10.1.1.1", x_forwarded_for=value) is None
    assert client("10.1.1.1", forwarded=", ".join(f"for={hop}" for hop in value.split(","))) is None


def test_the_headers_of_an_untrusted_peer_are_ignored() -> None:
    assert client("203.0.113.9", x_forwarded_for="10.0.0.1") is None
    assert client("203.0.113.9", forwarded="for=1.2.3.4") is None
    assert client("10.1.1.1") is None


def test_apply_replaces_the_request_client() -> None:
    request = DummyRequest([b""])
    request.client = IPv4Address("TCP", "10.1.1.1", 5555)
    request.requestHeaders.setRawHeaders(b"x-forwarded-for", [b"2001:db8::9"])
    PROXIES.apply(request)
    assert request.getClientAddress() == IPv6Address("TCP", "2001:db8::9", 0)
    untrusted = DummyRequest([b""])
    untrusted.client = IPv4Address("TCP", "8.8.8.8", 5555)
    untrusted.requestHeaders.setRawHeaders(b"x-forwarded-for", [b"1.1.1.1"])
    PROXIES.apply(untrusted)
    assert untrusted.getClientAddress().host == "8.8.8.8"


def test_trusted_proxies_and_haproxy_binds_are_options() -> None:
    options = Options()
    options.parseOptions(["--trusted-proxies", "127.0.0.1/32,::1", "--bind", "haproxy:127.0.0.1:8080"])
    assert [str(n) for n in options["trusted-proxies"]] == ["127.0.0.1/32", "::1/128"]
    assert parse_listen_address("haproxy:tcp:port=80") == ("haproxy:tcp:port=80", None)
    assert parse_listen_address("haproxy:[::1]:80") == ("haproxy:tcp6:port=80:interface=\\:\\:1", "::1")
    for bad in (
        ["--trusted-proxies", "10.0.0.0/33"],
        ["--trusted-proxies", "nope"],
        ["--bind", "haproxy:nope"],
    ):
        with pytest.raises(usage.UsageError):
            Options().parseOptions(bad)
