"""
The control API client for Twisted programs: pinned mutual TLS, every call a Deferred.

:func:`call` makes one control API request (see the control API reference,
docs/reference/control-api.rst) through an :class:`~twisted.web.iweb.IPolicyForHTTPS`,
usually a :class:`PinnedControlPolicy` built by :func:`policy_from_environ` from
the variables that :func:`kapow.core.credentials.credentials_environ` produces
(as init programs get them), or by :func:`policy_from_directory` from a
credentials directory.  ``kapow route`` applies the same policy with the
standard library's :mod:`ssl` (:mod:`kapow.commands.control_call`), so as to
start without Twisted or :mod:`cryptography`; both fail with the same
:class:`~kapow.commands.control_call.ControlError`.

Requests are made with :class:`twisted.web.client.Agent` and read with treq:
treq's own request path cannot address IPv6 literals (``https://[::1]:8081``).
Nothing here consults the default trust stores, so ``SSL_CERT_FILE`` and
friends cannot change what the client trusts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Mapping
from io import BytesIO
from typing import Any

import treq
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL.crypto import X509
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTCP
from twisted.internet.ssl import Certificate, TLSVersion, optionsForClientTLS
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

from kapow.commands.control_call import ControlError, failure_reason, refusal_reason
from kapow.core.credentials import (
    CLIENT_CERT_ENV,
    CLIENT_CERT_FILE,
    CLIENT_KEY_ENV,
    CLIENT_KEY_FILE,
    SERVER_CERT_ENV,
    SERVER_CERT_FILE,
    environ_pem_texts,
    parse_certificate,
    parse_key,
    read_file,
    require_match,
)

__all__ = [
    "ControlError",
    "PinnedControlPolicy",
    "call",
    "policy_from_directory",
    "policy_from_environ",
]


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


# -- the call ----------------------------------------------------------------------


@inlineCallbacks
def call(
    reactor: IReactorTCP,
    policy: IPolicyForHTTPS,
    control_url: str,
    method: str,
    path: str,
    body: object,
    expected: int,
) -> Generator[Deferred[Any], Any, str]:
    """
    Make one control API request and return the response body as text.

    :param reactor: where connections are made: a provider of
        :class:`~twisted.internet.interfaces.IReactorTCP`, and of
        ``IReactorTime`` and ``IReactorPluggableNameResolver`` too, as
        :class:`~twisted.web.client.Agent` needs (any real reactor).
    :param policy: pins the control server, e.g. a :class:`PinnedControlPolicy`.
    :param body: JSON-serialisable request body, or ``None``.
    :param expected: the status that means success.
    :raises ControlError: with the server's reason on any other status, or
        with why the control API could not be reached.
    """
    headers = Headers()
    producer = None
    if body is not None:
        headers.addRawHeader(b"Content-Type", b"application/json")
        producer = FileBodyProducer(BytesIO(json.dumps(body).encode()))
    url = control_url.rstrip("/") + path
    agent = Agent(reactor, contextFactory=policy)
    try:
        response: IResponse = yield agent.request(method.encode(), url.encode(), headers, producer)
    except Exception as e:
        raise ControlError(f"cannot reach control API at {control_url}: {_why(e)}") from e
    content: bytes = yield treq.content(response)
    if response.code != expected:
        raise ControlError(refusal_reason(content, response.code))
    return content.decode("utf-8", "replace")


def _why(e: BaseException) -> str:
    """:func:`~kapow.commands.control_call.failure_reason` of each failure
    that Twisted gathered in ``e`` (a connection attempt, a TLS handshake)."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(_why(r.value) for r in reasons)
    return failure_reason(e)
