"""
The client's address behind trusted reverse proxies (``--trusted-proxies``;
see docs/howto/scale-out.rst).

On a connection from a trusted proxy, the client is the rightmost address of
``X-Forwarded-For`` that is not itself a trusted proxy (or, without that
header, of ``Forwarded: for=``). The headers are ignored from any other
peer, and a header that does not parse leaves the peer's address: a client
can never choose its address by sending them itself.

The PROXY protocol needs nothing here: Twisted's ``haproxy:`` endpoint
wrapper gives the proxied client as the connection's peer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.http import Request
from twisted.web.http_headers import Headers

from kapow.core.auth import AuthError, Network, address_in, parse_networks

__all__ = ["TrustedProxies", "parse_trusted_proxies"]


def parse_trusted_proxies(text: str) -> tuple[Network, ...]:
    """
    The networks of ``--trusted-proxies CIDR[,CIDR...]``.

    :raises ValueError: with a one-line reason, for a bad list.
    """
    try:
        return parse_networks([part for part in text.split(",") if part.strip()] or [text])
    except AuthError as e:
        raise ValueError(str(e)) from None


def _address(text: str) -> str | None:
    """The IP address in one hop of a forwarding header (``1.2.3.4``, ``"[::1]:80"``, ``1.2.3.4:80``)."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _forwarded_for(values: Sequence[bytes]) -> list[str | None]:
    """The ``for=`` hops of ``Forwarded`` headers (RFC 7239), in order; ``None`` for one that is not an address."""
    hops: list[str | None] = []
    for value in values:
        for element in value.decode("latin-1").split(","):
            for pair in element.split(";"):
                name, equals, given = pair.strip().partition("=")
                if equals and name.strip().lower() == "for":
                    hops.append(_address(given))
    return hops


class TrustedProxies:
    """
    :param networks: the trusted proxies' networks.
    """

    def __init__(self, networks: tuple[Network, ...]) -> None:
        self.networks = networks

    def client(self, peer: str, headers: Headers) -> str | None:
        """
        The client's address for a request from ``peer`` with ``headers``,
        or ``None`` to keep the peer's.
        """
        if not address_in(peer, self.networks):
            return None
        values = headers.getRawHeaders(b"x-forwarded-for")
        if values:
            hops = [_address(hop) for value in values for hop in value.decode("latin-1").split(",")]
        else:
            values = headers.getRawHeaders(b"forwarded")
            if not values:
                return None
            hops = _forwarded_for(values)
        found = None
        for hop in reversed(hops):
            if hop is None:
                return None  # garbage: only the peer is known for sure
            found = hop
            if not address_in(hop, self.networks):
                break
        return found

    def apply(self, request: Request) -> None:
        """Make the client of ``request`` (``getClientAddress()``) the one its trusted proxy names."""
        peer = request.getClientAddress()
        host = getattr(peer, "host", None)
        if host is None:
            return
        client = self.client(host, request.requestHeaders)
        if client is not None and client != host:
            kind = IPv6Address if ":" in client else IPv4Address
            request.client = kind("TCP", client, 0)
