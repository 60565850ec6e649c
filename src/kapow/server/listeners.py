"""
The server's listeners (docs/reference/cli.rst, for the addresses they
take; docs/howto/limits.rst, for what they hold to): services that listen
on an endpoint, fail loudly with one line for the operator, log their real
address and give their URL; and how the listeners of one process are made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, cast
from urllib.parse import quote

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection
from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorSocket,
    IReactorTCP,
    IReactorTime,
    IReactorUNIX,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.web.server import Site

from kapow.server.options import parse_listen_address
from kapow.server.service import StartupError, startup_message
from kapow.web import tls
from kapow.web.connections import ConnectionLimit, Timeouts, guarded_protocol, with_backlog

__all__ = ["Address", "HeldListener", "IListeningReactor", "Listener", "Listening", "listener_named"]

log = Logger()


class IListeningReactor(IReactorTCP, IReactorUNIX, IReactorSocket, IReactorTime):
    """
    What listeners need of the reactor: it listens on the endpoints of
    ``tcp:``, ``unix:`` and ``systemd:`` descriptions, and times their
    connections.
    """


class Listener(StreamServerEndpointService):
    """
    A listening endpoint that fails loudly and remembers its real address;
    named ``label`` in the service tree.

    :param label: names the interface in logs and errors.
    :param scheme: ``http`` or ``https``, for the logged URL.
    :param host: the host as the operator wrote it, if any.
    :param worker: the number of the worker this listener serves in, if any.
    """

    _raiseSynchronously = True

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        label: str,
        scheme: str,
        host: str | None,
        worker: int | None = None,
    ) -> None:
        super().__init__(endpoint, factory)
        self.name = label
        self.label = label
        self.scheme = scheme
        self.host = host
        self.worker = worker
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            raise StartupError(f"{self.label} interface: {startup_message(e)}") from e
        assert self._waitingForPort is not None  # set by the start above
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        if self.worker is None:
            log.info("{label} interface listening on {url}", label=self.label, url=self.url())
        else:
            log.info(
                "worker {n} serves its {label} interface on {url}",
                n=self.worker,
                label=self.label,
                url=self.url(),
            )
        return port

    def url(self, host: str | None = None) -> str:
        """
        The URL of this listener, with its real port.

        :param host: the host to show instead of the one listened on (e.g.
            the name in the control certificate).
        """
        address = self.port.getHost() if self.port is not None else None
        # an IPv4Address or IPv6Address has both, a UNIXAddress a name
        ip: str | None = getattr(address, "host", None)
        port: int | None = getattr(address, "port", None)
        if ip is None or port is None:
            name = getattr(address, "name", None)
            if isinstance(name, bytes):
                name = name.decode()
            if name:
                return f"{self.scheme}+unix://{quote(name, safe='')}"
            return f"{self.scheme}://{self.host or 'localhost'}"
        shown = host or self.host or ("localhost" if ip in ("0.0.0.0", "::") else ip)
        if ":" in shown:
            shown = f"[{shown}]"
        return f"{self.scheme}://{shown}:{port}"


def listener_named(service: IServiceCollection, label: str) -> Listener:
    """The listener of ``service`` for the interface ``label`` (``user``, ``data``, ...)."""
    listener = service.getServiceNamed(label)
    if not isinstance(listener, Listener):
        raise LookupError(f"{label} is not a listener: {listener!r}")
    return listener


class HeldListener(Listener):
    """
    A listener whose socket is opened here and accepted on elsewhere: it
    never reads, its descriptor is handed to the workers of ``--workers``.
    """

    def _listening(self, port: IListeningPort) -> IListeningPort:
        _descriptor(port).stopReading()
        return super()._listening(port)

    def fileno(self) -> int:
        """The listening socket's descriptor."""
        assert self.port is not None
        return _descriptor(self.port).fileno()


def _descriptor(port: IListeningPort) -> FileDescriptor:
    # the port of a stream server endpoint (tcp, unix, adopted) is a tcp.Port,
    # a FileDescriptor; no interface has its fileno() and stopReading() both
    return cast(FileDescriptor, port)


class Address(NamedTuple):
    """Where a listener listens: its endpoint, and the host as the operator wrote it."""

    endpoint: IStreamServerEndpoint
    host: str | None


@dataclass(frozen=True)
class Listening:
    """
    How every listener of this process listens (docs/howto/limits.rst): the
    listen backlog, the connections each may hold at once, and the time
    limits of their connections.

    :ivar data_timeouts: the data API's: handlers on this machine keep their
        connection to it between appends.
    :ivar worker: the number of the worker this process is, if it is one.
    """

    reactor: IListeningReactor
    backlog: int
    max_connections: int
    timeouts: Timeouts
    data_timeouts: Timeouts
    worker: int | None = None

    def endpoint(self, flag: str, address: str) -> Address:
        """The endpoint of the listener ``--flag address``."""
        description, host = parse_listen_address(address)
        description = with_backlog(description, self.backlog)
        try:
            return Address(serverFromString(self.reactor, description), host)
        except LookupError as e:
            raise StartupError(
                f"--{flag} {address}: systemd passed no such socket "
                "(is its .socket unit active, with that FileDescriptorName=?)"
            ) from e
        except (ValueError, TypeError, AttributeError) as e:  # AttributeError: domain=BOGUS
            raise StartupError(f"--{flag} {address}: {e}") from e

    def listener(
        self,
        address: Address,
        site: Site,
        label: str,
        *,
        tls_options: IOpenSSLServerConnectionCreator | None = None,
        timeouts: Timeouts | None = None,
    ) -> Listener:
        """
        The listener serving ``site`` at ``address``, over TLS with
        ``tls_options``, its connections guarded and counted. The user
        interface over TLS answers a plain HTTP request as the reference
        does (:func:`~kapow.web.tls.tls_server_endpoint`).
        """
        endpoint = address.endpoint
        if tls_options is not None:
            endpoint = tls.tls_server_endpoint(endpoint, tls_options, answer_plain_http=label == "user")
        protocol = guarded_protocol(timeouts or self.timeouts, self.reactor, tls=tls_options is not None)
        site.protocol = protocol  # type: ignore[method-assign,assignment]  # typed as twisted.web's own channel factory; any callable making a channel does
        site.noisy = False  # the listener logs its own line; no "Starting factory <...Site object at 0x...>"
        limited = ConnectionLimit(endpoint, self.max_connections, label, self.reactor)
        scheme = "http" if tls_options is None else "https"
        return Listener(limited, site, label, scheme, address.host, self.worker)

    def handing_over(self, factory: IProtocolFactory, address: Address) -> Listener:
        """
        The data API's listener in the main process of ``--workers N``:
        ``factory`` hands each connection to a worker
        (:class:`kapow.data.handoff.HandOffFactory`); counted while here.
        """
        limited = ConnectionLimit(address.endpoint, self.max_connections, "data", self.reactor)
        return Listener(limited, factory, "data", "http", address.host, self.worker)

    def held(self, address: Address, *, https: bool) -> HeldListener:
        """The user interface's listener whose socket the workers accept on."""
        never_accepting = Factory()
        never_accepting.noisy = False
        return HeldListener(
            address.endpoint, never_accepting, "user", "https" if https else "http", address.host, self.worker
        )
