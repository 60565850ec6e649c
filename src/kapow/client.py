"""
The control API client for Twisted programs: pinned mutual TLS, every call a Deferred.

:class:`ControlClient` makes the calls of the control API (see the control
API reference, docs/reference/control-api.rst) with treq, through a
:class:`PinnedControlPolicy`: built by :meth:`ControlClient.from_environ`
from the variables that :func:`kapow.core.credentials.credentials_environ`
produces (as init programs get them), or by
:meth:`ControlClient.from_directory` from a credentials directory.  A call
the server refuses fails with
:class:`~kapow.commands.control_call.ControlError`, the error of ``kapow
route`` too, which applies the same policy with the standard library's
:mod:`ssl` (:mod:`kapow.commands.control_call`) so as to start without
Twisted or :mod:`cryptography`.  Nothing here consults the default trust
stores, so ``SSL_CERT_FILE`` and friends cannot change what the client
trusts.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import treq
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from hyperlink import EncodedURL
from OpenSSL.crypto import X509
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS
from twisted.web.client import Agent
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from kapow.commands.control_call import ControlError
from kapow.core.credentials import (
    CLIENT_CERT_ENV,
    CLIENT_CERT_FILE,
    CLIENT_KEY_ENV,
    CLIENT_KEY_FILE,
    CONTROL_URL_ENV,
    DEFAULT_CONTROL_URL,
    SERVER_CERT_ENV,
    SERVER_CERT_FILE,
    CredentialsError,
    environ_pem_texts,
    parse_certificate,
    parse_key,
    read_control_url,
    read_file,
    require_match,
)

if TYPE_CHECKING:
    # What HTTPClient.request's Deferred is declared to carry; Deferred is
    # invariant, so TreqClient must name the same type.
    from treq.response import _Response

__all__ = [
    "CONTROL_URL_ENV",
    "DEFAULT_CONTROL_URL",
    "ControlClient",
    "ControlError",
    "CredentialsError",
    "IClientReactor",
    "PinnedControlPolicy",
    "TreqClient",
    "policy_from_directory",
    "policy_from_environ",
]


#: A route, a handler or a run record: the JSON object the control API answers.
JSONObject = dict[str, Any]


class IClientReactor(IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
    """
    What the client needs of the reactor: what :class:`twisted.web.client.Agent`
    connects with (any real reactor provides it).
    """


class TreqClient(Protocol):
    """
    What :class:`ControlClient` needs to make requests: a
    :class:`treq.client.HTTPClient`, or a :class:`treq.testing.StubTreq` in tests.
    """

    def request(
        self,
        method: str,
        url: EncodedURL,
        *,
        params: list[tuple[str, str]] | None = ...,
        json: object = ...,
        allow_redirects: bool = ...,
    ) -> Deferred[_Response]: ...


# -- the pinned TLS settings -------------------------------------------------------


@implementer(IPolicyForHTTPS)
class PinnedControlPolicy:
    """HTTPS policy for clients of the control interface.

    Connections trust exactly the pinned server certificate (never a default
    trust store), check that it names the host or IP address of the URL, and
    present the pinned client certificate.

    :param server_cert_pem: the control server certificate, PEM.
    :param client_cert_pem: the control client certificate, PEM.
    :param client_key_pem: the control client private key, PEM.
    :raises CredentialsError: if a text is not PEM or the key does not match
        the client certificate.
    """

    def __init__(self, server_cert_pem: bytes, client_cert_pem: bytes, client_key_pem: bytes) -> None:
        server_cert = parse_certificate(server_cert_pem, "control server certificate")
        client_cert = parse_certificate(client_cert_pem, "control client certificate")
        client_key: PrivateKeyTypes = parse_key(client_key_pem, "control client key")
        require_match(client_cert, client_key, "control client certificate", "control client key")
        self._trust_root = Certificate(X509.from_cryptography(server_cert))
        self._client_cert = client_cert
        self._client_key = client_key

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """Client TLS settings for a connection to ``hostname``.

        :param hostname: host of the URL (an IPv6 literal without brackets).
        :param port: port of the URL (unused: the pin does not depend on it).
        """
        # The client certificate goes in as cryptography objects: Twisted's
        # clientCertificate= hands pyOpenSSL objects to pyOpenSSL, which warns.
        return optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self._trust_root,
            extraCertificateOptions={
                "privateKey": self._client_key,
                "certificate": self._client_cert,
                "raiseMinimumTo": TLSVersion.TLSv1_2,
            },
        )


def policy_from_environ(environ: Mapping[str, str]) -> PinnedControlPolicy:
    """Build the control client policy from the environment.

    Reads ``KAPOW_CONTROL_SERVER_CERT``, ``KAPOW_CONTROL_CLIENT_CERT`` and
    ``KAPOW_CONTROL_CLIENT_KEY`` (PEM texts, as
    :func:`kapow.core.credentials.credentials_environ` makes them).

    :param environ: e.g. ``os.environ``.
    :raises CredentialsError: naming the variable that is missing, empty or
        unusable.
    """
    server_cert_pem, client_cert_pem, client_key_pem = environ_pem_texts(environ)
    parse_certificate(server_cert_pem, SERVER_CERT_ENV)
    require_match(
        parse_certificate(client_cert_pem, CLIENT_CERT_ENV),
        parse_key(client_key_pem, CLIENT_KEY_ENV),
        CLIENT_CERT_ENV,
        CLIENT_KEY_ENV,
    )
    return PinnedControlPolicy(server_cert_pem, client_cert_pem, client_key_pem)


def policy_from_directory(directory: str) -> PinnedControlPolicy:
    """Build the control client policy from a credentials directory.

    Reads the files :func:`kapow.core.credentials.write_client_credentials`
    writes (the server certificate, the client certificate and its key),
    e.g. for an operator's shell.

    :raises CredentialsError: naming the file that is missing or unusable.
    """
    return PinnedControlPolicy(
        read_file(os.path.join(directory, SERVER_CERT_FILE)),
        read_file(os.path.join(directory, CLIENT_CERT_FILE)),
        read_file(os.path.join(directory, CLIENT_KEY_FILE), private=True),
    )


# -- the client --------------------------------------------------------------------


class ControlClient:
    """
    The calls of the control API; each returns a Deferred.

    A call the server answers with a status other than 2xx fails with
    :class:`ControlError`, whose ``status`` is that status and ``reason``
    (and ``detail``, when the server gives one) what its JSON body says;
    its ``str()`` is ``REASON: DETAIL`` (or ``REASON``, or ``HTTP STATUS``
    when the body names no reason), as ``kapow route`` prints it.  A connection or TLS failure fails with Twisted's own error
    (:class:`~twisted.internet.error.ConnectionRefusedError`,
    :class:`~twisted.web._newclient.ResponseNeverReceived` carrying the TLS
    error, ...).  No call times out by itself: add a timeout to its Deferred
    (``d.addTimeout(10, reactor)``) where one is wanted.

    :param url: the control API, ``https://HOST[:PORT]`` with an optional path
        prefix; an IPv6 address is bracketed (``https://[::1]:8081``).
    :param http: makes the requests: a :class:`treq.client.HTTPClient` over an
        :class:`~twisted.web.client.Agent` with a :class:`PinnedControlPolicy`
        (as :meth:`from_environ` and :meth:`from_directory` make it), or a
        :class:`treq.testing.StubTreq` in tests.
    :raises ValueError: if ``url`` is not an ``https`` URL with a host.
    """

    def __init__(self, url: str, http: TreqClient) -> None:
        try:
            parsed = EncodedURL.from_text(url)
        except ValueError:
            parsed = None
        if parsed is None or parsed.scheme.lower() != "https" or not parsed.host:
            raise ValueError(
                f"control URL {url!r}: not an https://HOST[:PORT] URL (the control API is HTTPS only)"
            )
        self._url = url
        self._prefix = parsed.replace(query=(), fragment="").to_text().rstrip("/")
        self._http = http

    @classmethod
    def from_environ(cls, reactor: IClientReactor, environ: Mapping[str, str] | None = None) -> ControlClient:
        """The client of the control API an init program is given.

        The URL is ``$KAPOW_CONTROL_URL`` (``https://localhost:8081`` when it
        is unset or empty, as for ``kapow route``); the credentials are the
        PEM texts of ``KAPOW_CONTROL_SERVER_CERT``,
        ``KAPOW_CONTROL_CLIENT_CERT`` and ``KAPOW_CONTROL_CLIENT_KEY``.

        :param environ: where the variables are read; ``os.environ`` by default.
        :raises CredentialsError: naming the variable that is missing, empty
            or unusable.
        :raises ValueError: if the URL is not an ``https`` URL.
        """
        if environ is None:
            environ = os.environ
        url = environ.get(CONTROL_URL_ENV) or DEFAULT_CONTROL_URL
        return cls.pinned(reactor, url, policy_from_environ(environ))

    @classmethod
    def from_directory(cls, reactor: IClientReactor, url: str | None, directory: str) -> ControlClient:
        """A client of the control API at ``url`` with the credentials in ``directory``.

        Reads ``server.crt``, ``client.crt`` and ``client.key``, as ``kapow
        server --write-control-credentials DIR`` and ``kapow
        control-credentials DIR`` write them; the key must not be readable by
        group or others.

        :param url: ``None`` for the URL the directory records (its
            ``control_url``, which ``kapow server`` writes beside the
            credentials), else ``https://localhost:8081``, as ``kapow route
            --control-credentials DIR`` finds it.
        :raises CredentialsError: naming the file that is missing or unusable.
        :raises ValueError: if ``url`` is not an ``https`` URL.
        """
        policy = policy_from_directory(directory)
        if url is None:
            url = read_control_url(directory) or DEFAULT_CONTROL_URL
        return cls.pinned(reactor, url, policy)

    @classmethod
    def pinned(cls, reactor: IClientReactor, url: str, policy: IPolicyForHTTPS) -> ControlClient:
        """A client of the control API at ``url`` whose connections follow ``policy``.

        :param policy: e.g. a :class:`PinnedControlPolicy`.
        :raises ValueError: if ``url`` is not an ``https`` URL.
        """
        return cls(url, HTTPClient(Agent(reactor, contextFactory=policy)))

    @property
    def url(self) -> str:
        """The control API's URL, as given."""
        return self._url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._url!r})"

    # -- routes

    def list_routes(self) -> Deferred[list[JSONObject]]:
        """Every route, in table order, each with its ``index`` (``GET /routes``)."""
        return self._call("GET", "/routes")

    def get_route(self, route_id: str) -> Deferred[JSONObject]:
        """One route (``GET /routes/{id}``); 404 ``Route Not Found``."""
        return self._call("GET", "/routes/" + _segment(route_id))

    def add_route(
        self,
        url_pattern: str,
        command: str | None = None,
        *,
        method: str = "GET",
        entrypoint: str | None = None,
        index: int | None = None,
        **fields: object,
    ) -> Deferred[JSONObject]:
        """Add a route; fires with the route as stored, its ``id`` and ``index`` included.

        The route is appended (``POST /routes``), or inserted at ``index``
        (``PUT /routes``: past the end means last).  422 ``Invalid Route``
        for what the server refuses.

        :param url_pattern: the path pattern, e.g. ``/hello/{name}``.
        :param command: the last argument of the entrypoint; none by default.
        :param method: the HTTP method the route matches.
        :param entrypoint: the program to run, split like shell words; the
            server's default (``/bin/sh -c``) when ``None``.
        :param fields: the route's other fields, as the control API names
            them (``buffer=True``, ``max_concurrency=4``, ``limits={...}``, ...).
        """
        route: dict[str, object] = {"method": method, "url_pattern": url_pattern}
        if entrypoint is not None:
            route["entrypoint"] = entrypoint
        if command is not None:
            route["command"] = command
        route.update(fields)
        if index is None:
            return self._call("POST", "/routes", body=route)
        route["index"] = index
        return self._call("PUT", "/routes", body=route)

    def remove_route(self, route_id: str) -> Deferred[None]:
        """Remove a route (``DELETE /routes/{id}``); 404 ``Route Not Found``."""
        return self._call("DELETE", "/routes/" + _segment(route_id))

    # -- handlers

    def list_handlers(self) -> Deferred[list[JSONObject]]:
        """Every live handler, queued or running, oldest first (``GET /handlers``)."""
        return self._call("GET", "/handlers")

    def get_handler(self, handler_id: str) -> Deferred[JSONObject]:
        """One live handler (``GET /handlers/{id}``); 404 ``Handler Not Found``."""
        return self._call("GET", "/handlers/" + _segment(handler_id))

    def kill_handler(self, handler_id: str) -> Deferred[None]:
        """End a handler's process group (``DELETE /handlers/{id}``); fires once
        it got SIGTERM.  404 ``Handler Not Found``."""
        return self._call("DELETE", "/handlers/" + _segment(handler_id))

    # -- run history

    def history(
        self,
        *,
        route_id: str | None = None,
        outcome: str | None = None,
        since: str | datetime.datetime | float | None = None,
        limit: int | None = None,
    ) -> Deferred[list[JSONObject]]:
        """The run records that match every filter given, newest first (``GET /history``).

        :param route_id: only the runs of this route.
        :param outcome: only runs that ended so: ``ok``, ``error``,
            ``signal``, ``timeout``, ``disconnect`` or ``killed``.
        :param since: only runs started at or after this time: RFC 3339 text
            (sent as it is), a :class:`~datetime.datetime` with its time zone,
            or seconds since the epoch (``time.time() - 3600``).
        :param limit: at most this many records (the server's default: 100,
            at most 10,000).

        Fails with :class:`ValueError`, before asking, for a ``since`` that
        is a datetime without a time zone or a number that is no time; with
        :class:`ControlError` 400 ``Invalid Query`` for a value the server
        refuses.
        """
        query: list[tuple[str, str]] = []
        if route_id is not None:
            query.append(("route_id", route_id))
        if outcome is not None:
            query.append(("outcome", outcome))
        if since is not None:
            try:
                query.append(("since", _rfc3339(since)))
            except ValueError as e:
                return fail(e)
        if limit is not None:
            query.append(("limit", str(limit)))
        return self._call("GET", "/history", query=query)

    def run(self, run_id: str) -> Deferred[JSONObject]:
        """One run record, by its handler's id (``GET /history/{id}``); 404 ``Run Not Found``."""
        return self._call("GET", "/history/" + _segment(run_id))

    # -- the call

    def _call(
        self, method: str, path: str, *, body: object = None, query: list[tuple[str, str]] | None = None
    ) -> Deferred[Any]:
        """What the call answers: its JSON, or ``None`` for an empty body."""
        return Deferred.fromCoroutine(self._answer(method, path, body, query))

    async def _answer(self, method: str, path: str, body: object, query: list[tuple[str, str]] | None) -> Any:
        url = _ControlURL.from_text(self._prefix + path)
        # The control API never redirects: a 3xx fails as any other
        # answer that is not 2xx does, instead of being followed.
        if body is None:
            requested = self._http.request(method, url, params=query, allow_redirects=False)
        else:
            requested = self._http.request(method, url, json=body, allow_redirects=False)
        response = await requested
        content = await treq.content(response)
        if not 200 <= response.code < 300:
            raise ControlError.refused(content, response.code)
        return json.loads(content) if content else None


class _ControlURL(EncodedURL):
    """
    A URL that treq can send to an IPv6 address.

    treq makes every URL it sends ASCII with hyperlink's ``to_uri()``, which
    passes the host through IDNA, and IDNA refuses an IPv6 address
    (python-hyper/hyperlink#68).  An address needs no IDNA: here it stays as
    it is, and the rest of the URL is made ASCII as hyperlink makes it.
    """

    def to_uri(self) -> EncodedURL:
        if ":" not in self.host:
            return super().to_uri()
        return EncodedURL.to_uri(self.replace(host="")).replace(host=self.host)


def _segment(text: str) -> str:
    """``text`` percent-encoded as one path segment."""
    return quote(text, safe="")


def _rfc3339(moment: str | datetime.datetime | float) -> str:
    """``moment`` as RFC 3339 text; a datetime or seconds since the epoch in UTC, with ``Z``.

    :raises ValueError: for a datetime without a time zone, or a number that
        is not a time (``nan``, ``True``, out of the datetime's range).
    """
    if isinstance(moment, str):
        return moment
    if not isinstance(moment, datetime.datetime):
        if isinstance(moment, bool) or not isinstance(moment, int | float):
            raise ValueError(
                f"since={moment!r}: RFC 3339 text, a datetime or seconds since the epoch is needed"
            )
        try:
            moment = datetime.datetime.fromtimestamp(moment, datetime.UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"since={moment!r}: not a time") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"since={moment!r}: a datetime with a time zone is needed")
    return moment.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
