"""
The ``kapow`` service: its command-line options and ``makeService``.

This is the only module that reads server options, turns addresses into
endpoints and assembles the service tree; ``twist kapow``, ``twistd kapow``
and ``kapow server`` all come through here.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import ssl
import sys
from typing import Any

from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python import usage
from twisted.web.server import Site

from kapow.commands.launcher import native_client
from kapow.control.api import ControlAPI
from kapow.core import credentials
from kapow.core.metrics import Metrics
from kapow.core.resource_limits import InvalidLimit, LimitedCommand, parse_limit
from kapow.core.routes import DEFAULT_QUEUE_TIMEOUT, MAX_QUEUE, RouteTable
from kapow.data.api import DataAPI
from kapow.data.channel import DataChannel
from kapow.data.proxy import DataProxy
from kapow.handlers.admission import LocalAdmission, ServerQueue, Slots
from kapow.handlers.containment import Containment
from kapow.handlers.governor import Governor, Limits
from kapow.handlers.handler import HandlerRegistry
from kapow.handlers.spawn import SPAWN_THREADS, Spawner, pidfds_work, quiet_sigchld
from kapow.server import systemd
from kapow.server.init_programs import InitProgramsService
from kapow.server.metrics_http import CountingQuietSite, MetricsResource
from kapow.server.service import KapowService, LauncherDirectory, Listener, StartupError, fatal
from kapow.server.workers.messages import MAIN_FD, USER_FD, worker_handler_ids
from kapow.server.workers.pool import STOP_MARGIN, HandlersOfWorkers, HeldListener, WorkerPool
from kapow.server.workers.worker import GatedEndpoint, MainAdmission, WorkerLink
from kapow.user.api import UserAPI, UserSite
from kapow.user.proxies import TrustedProxies, parse_trusted_proxies
from kapow.web import tls
from kapow.web.connections import (
    ConnectionLimit,
    GuardedChannel,
    Timeouts,
    default_max_connections,
    guarded_protocol,
    raise_open_files_limit,
    system_backlog,
    with_backlog,
)
from kapow.web.errors import QuietSite, bounded_request_factory

log = Logger()

#: Largest request body the control API buffers (a route is a few hundred bytes).
CONTROL_MAX_BODY = 1024 * 1024

_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]+)")
_ENDPOINT_TYPES = {"tcp", "tcp6", "unix", "systemd"}

#: The hidden option that makes the server one worker of ``--workers N``.
WORKER_OPTION = "--worker"


def parse_listen_address(addr: str) -> tuple[str, str | None]:
    """
    Turn a listener flag into a Twisted endpoint description.

    The reference's ``host:port`` form (``0.0.0.0:8080``, ``localhost:8081``,
    ``[::1]:8082``, ``:8080`` for every interface) is accepted, and so is any
    endpoint description whose type is one of ``tcp``, ``tcp6``, ``unix``,
    ``systemd``, and either of the first three (or ``HOST:PORT``) behind
    ``haproxy:`` for the PROXY protocol (TLS comes from ``--certfile``/``--keyfile`` and, for the
    control API, always; never from the description).

    :return: the description and the host as written (``None`` for an
        endpoint description or an empty host).
    :raises StartupError: for anything else.
    """
    kind = addr.split(":", 1)[0]
    if kind == "haproxy":
        inner, host = parse_listen_address(addr[len("haproxy:") :])
        if inner.startswith(("haproxy:", "systemd:")):
            raise StartupError(f"{addr!r}: haproxy: wraps a tcp, tcp6, unix or HOST:PORT address")
        return "haproxy:" + inner, host
    if kind in _ENDPOINT_TYPES:
        return addr, None
    if kind in ("ssl", "tls"):
        raise StartupError(f"{addr!r}: TLS comes from --certfile/--keyfile, not from an {kind}: endpoint")
    m = _HOST_PORT.fullmatch(addr)
    if m is None:
        raise StartupError(f"invalid address {addr!r}: expected HOST:PORT or an endpoint description")
    port = int(m["port"])
    if port > 65535:
        raise StartupError(f"invalid address {addr!r}: port out of range")
    if m["v6"] is not None:
        if not _is_ipv6(m["v6"]):
            raise StartupError(f"invalid address {addr!r}: not an IPv6 address")
        return f"tcp6:port={port}:interface={_escape(m['v6'])}", m["v6"]
    host = m["host"]
    if not host:
        return f"tcp:port={port}", None
    return f"tcp:port={port}:interface={_escape(host)}", host


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


class Options(usage.Options):
    """Options of ``kapow server`` / ``twist kapow``."""

    synopsis = "kapow server [options] [INIT_PROGRAM ...]"
    longdesc = (
        "Serve HTTP routes backed by shell commands. Each INIT_PROGRAM is run once "
        "the listeners are up, with KAPOW_CONTROL_URL, KAPOW_DATA_URL and the "
        "control certificates in its environment, and usually calls `kapow route add`. "
        "Listener addresses are HOST:PORT or a Twisted endpoint description "
        "(tcp:..., unix:..., systemd:domain=INET:name=kapow-user).\n\n"
        "Example: kapow server --bind 127.0.0.1:8080 examples/hello.pow"
    )

    optParameters = [
        ["bind", None, "0.0.0.0:8080", "User interface address."],
        ["control-bind", None, "localhost:8081", "Control API address (always mutual TLS)."],
        ["data-bind", None, "localhost:8082", "Data API address (keep it on loopback)."],
        [
            "control-reachable-addr",
            None,
            None,
            "HOST:PORT at which init programs reach the control API; its host goes into "
            "the control certificate. [default: the control bind, localhost:8081]",
        ],
        [
            "metrics-bind",
            None,
            None,
            "Serve Prometheus metrics at /metrics on this address (plain HTTP) [default: off].",
        ],
        ["certfile", None, None, "Certificate (chain) for HTTPS on the user interface."],
        ["keyfile", None, None, "Private key for --certfile."],
        [
            "clientcafile",
            None,
            None,
            "CA bundle user client certificates must chain to (with --clientauth) "
            "[default: the system CA bundle].",
        ],
        [
            "control-credentials",
            None,
            None,
            "Use server.crt, server.key, client.crt, client.key from this directory "
            "for the control API instead of generating them (see `kapow control-credentials`).",
        ],
        [
            "data-client",
            None,
            "auto",
            "The kapow get/set that handlers run: native (the C client built at install), "
            "python (the lean Python client) or auto (native when it was built).",
        ],
        [
            "write-control-credentials",
            None,
            None,
            "Write server.crt, client.crt and client.key for the control API into this "
            "directory (mode 0700/0600), for curl and operator shells.",
        ],
    ]
    optFlags = [
        ["clientauth", None, "Require client certificates on the user interface (HTTPS)."],
        ["debug", None, "Log the handlers' stdout and stderr."],
        [
            "keep-running-on-disconnect",
            None,
            "Leave handlers running when their client hangs up (routes may override).",
        ],
    ]

    def _positive(self, flag: str, kind: type, value: str, minimum: float) -> float | int:
        try:
            number = kind(value)
        except ValueError:
            raise usage.UsageError(f"--{flag} must be a number, not {value!r}") from None
        if not math.isfinite(number) or number < minimum:
            raise usage.UsageError(f"--{flag} must be at least {minimum}")
        return number

    def opt_handler_timeout(self, value: str) -> None:
        """Seconds a handler may run when its route sets no timeout [default: no limit]."""
        self["handler-timeout"] = self._positive("handler-timeout", float, value, 0.001)

    def opt_kill_grace(self, value: str) -> None:
        """Seconds between SIGTERM and SIGKILL when ending a handler [default: 3]."""
        self["kill-grace"] = self._positive("kill-grace", float, value, 0)

    def opt_max_handlers(self, value: str) -> None:
        """At most this many handler processes at once; more requests get 503 [default: no limit]."""
        self["max-handlers"] = self._positive("max-handlers", int, value, 1)

    def opt_header_timeout(self, value: str) -> None:
        """Seconds a client has to send a request's headers, from its first byte [default: 30]."""
        self["header-timeout"] = self._above_zero("header-timeout", float, value)

    def opt_idle_timeout(self, value: str) -> None:
        """Seconds a keep-alive connection may wait for its next request [default: 60]."""
        self["idle-timeout"] = self._above_zero("idle-timeout", float, value)

    def opt_body_min_rate(self, value: str) -> None:
        """Bytes per second a request body must average, after --header-timeout seconds [default: 500]."""
        self["body-min-rate"] = self._above_zero("body-min-rate", float, value)

    def opt_backlog(self, value: str) -> None:
        """Listen backlog of every listener [default: the system's, net.core.somaxconn]."""
        self["backlog"] = self._above_zero("backlog", int, value)

    def opt_max_connections(self, value: str) -> None:
        """Connections each listener holds at once; more are closed at once [default: from the open files limit]."""
        self["max-connections"] = self._above_zero("max-connections", int, value)

    def _above_zero(self, flag: str, kind: type, value: str) -> float | int:
        try:
            number = kind(value)
        except ValueError:
            raise usage.UsageError(f"--{flag} must be a positive number, not {value!r}") from None
        if not math.isfinite(number) or number <= 0:
            raise usage.UsageError(f"--{flag} must be a positive number, not {value!r}")
        return number

    def opt_queue(self, value: str) -> None:
        """With --max-handlers: up to this many requests wait for a free slot instead of a 503 [default: 0]."""
        self["queue"] = int(self._positive("queue", int, value, 0))
        if self["queue"] > MAX_QUEUE:
            raise usage.UsageError(f"--queue must be at most {MAX_QUEUE}")

    def opt_queue_timeout(self, value: str) -> None:
        """Seconds a request may wait in the --queue before a 503 [default: 30]."""
        self["queue-timeout"] = self._positive("queue-timeout", float, value, 0.001)

    def opt_limit(self, value: str) -> None:
        """A resource limit of every handler, NAME=VALUE (memory, cpu, open_files, file_size, processes; sizes take K, M, G), repeatable; a route's own value wins."""
        try:
            name, number = parse_limit(value)
        except InvalidLimit as e:
            raise usage.UsageError(str(e)) from None
        self["limits"][name] = number

    def opt_trusted_proxies(self, value: str) -> None:
        """CIDR[,CIDR...] of reverse proxies whose X-Forwarded-For or Forwarded header names the client."""
        try:
            self["trusted-proxies"] = parse_trusted_proxies(value)
        except ValueError as e:
            raise usage.UsageError(f"--trusted-proxies: {e}") from None

    def opt_workers(self, value: str) -> None:
        """Worker processes serving the user interface, or auto: one per CPU this process may use [default: 1]."""
        if value == "auto":
            self["workers"] = len(os.sched_getaffinity(0))
            return
        try:
            number = int(value)
        except ValueError:
            raise usage.UsageError(f"--workers must be a number or auto, not {value!r}") from None
        if number < 1:
            raise usage.UsageError("--workers must be at least 1")
        self["workers"] = number

    def opt_worker(self, value: str) -> None:
        # hidden (see getUsage): the main process of --workers starts its workers with it
        self["worker"] = int(value)

    def getUsage(self, width: int | None = None) -> str:
        shown = self.longOpt
        self.longOpt = [name for name in shown if name != WORKER_OPTION[2:] + "="]
        try:
            return super().getUsage(width)
        finally:
            self.longOpt = shown

    def parseOptions(self, options: list[str] | None = None) -> None:
        #: the command line as given, which workers get too
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_shutdown_timeout(self, value: str) -> None:
        """Seconds a graceful stop waits for running handlers before ending them [default: 30]."""
        self["shutdown-timeout"] = self._positive("shutdown-timeout", float, value, 0)

    def __init__(self) -> None:
        super().__init__()
        self["handler-timeout"] = None
        self["kill-grace"] = 3.0
        self["max-handlers"] = None
        self["queue"] = 0
        self["queue-timeout"] = DEFAULT_QUEUE_TIMEOUT
        self["limits"] = {}
        self["shutdown-timeout"] = 30.0
        self["workers"] = 1
        self["worker"] = None
        self["header-timeout"] = 30.0
        self["idle-timeout"] = 60.0
        self["body-min-rate"] = 500.0
        self["backlog"] = None
        self["max-connections"] = None
        self["trusted-proxies"] = None

    def opt_version(self) -> None:
        """Print the version and exit."""
        from kapow import __version__

        sys.stdout.write(f"kapow {__version__}\n")
        raise SystemExit(0)

    def parseArgs(self, *programs: str) -> None:
        self["init_programs"] = list(programs)

    def postOptions(self) -> None:
        if bool(self["certfile"]) != bool(self["keyfile"]):
            raise usage.UsageError("--certfile and --keyfile go together")
        if self["clientauth"] and not self["certfile"]:
            raise usage.UsageError("--clientauth needs HTTPS: give --certfile and --keyfile")
        if self["clientcafile"] and not self["clientauth"]:
            raise usage.UsageError("--clientcafile needs --clientauth")
        if self["data-client"] not in ("auto", "native", "python"):
            raise usage.UsageError(
                f"--data-client must be auto, native or python, not {self['data-client']!r}"
            )
        if self["data-client"] == "native" and native_client() is None:
            raise usage.UsageError(
                "--data-client native: the native client was not built (no C compiler at install?)"
            )
        if self["limits"] and LimitedCommand.find(native_client()) is None:
            raise usage.UsageError("--limit needs the native kapow client or prlimit(1); neither is here")
        if self["control-bind"].startswith("unix:"):
            raise usage.UsageError("--control-bind must be a TCP address: kapow route reaches it over TCP")
        try:
            for flag in ("bind", "control-bind", "data-bind"):
                parse_listen_address(self[flag])
            if self["metrics-bind"] is not None:
                if self["metrics-bind"].startswith("haproxy:"):
                    raise StartupError("--metrics-bind: the PROXY protocol is for --bind only")
                parse_listen_address(self["metrics-bind"])
            if self["control-reachable-addr"] is not None:
                credentials.reachable_host(self["control-reachable-addr"])
        except (StartupError, ValueError) as e:
            raise usage.UsageError(str(e)) from None


def _control_credentials(options: Options, reachable: str) -> credentials.ControlCredentials:
    try:
        if options["control-credentials"]:
            creds = credentials.load_control_credentials(options["control-credentials"])
        else:
            creds = credentials.generate_control_credentials(reachable)
        if options["write-control-credentials"]:
            credentials.write_client_credentials(creds, options["write-control-credentials"])
    except (credentials.CredentialsError, OSError, ValueError) as e:
        raise StartupError(f"control credentials: {e}") from e
    return creds


def _reachable_addr(options: Options) -> str:
    if options["control-reachable-addr"] is not None:
        return options["control-reachable-addr"]
    _, host = parse_listen_address(options["control-bind"])
    m = _HOST_PORT.fullmatch(options["control-bind"])
    if host is None or m is None:
        return "localhost:8081"
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    return f"[{host}]:{m['port']}" if ":" in host else f"{host}:{m['port']}"


def _user_tls(options: Options) -> Any:
    if not options["certfile"]:
        return None
    cafile = options["clientcafile"]
    if options["clientauth"] and not cafile:
        cafile = ssl.get_default_verify_paths().cafile
        if cafile is None:
            raise StartupError("--clientauth: no system CA bundle found; give --clientcafile")
    try:
        return tls.ReloadableServerOptions(
            lambda: tls.user_server_options(options["certfile"], options["keyfile"], cafile)
        )
    except credentials.CredentialsError as e:
        raise StartupError(f"user HTTPS: {e}") from e


def build_service(options: Options, reactor: Any) -> KapowService:
    """
    Assemble the server from parsed ``options``: the whole server; or, with
    ``--workers N``, the main process (control API, route table, init
    programs, and N workers serving the user interface); or one of those
    workers (the hidden ``--worker`` option), which is the whole server
    without the control API and the init programs.

    :raises StartupError: when a certificate, key or address is unusable.
    """
    worker = options["worker"]
    workers = options["workers"] if worker is None else 1
    open_files, before = raise_open_files_limit()
    max_connections = options["max-connections"] or default_max_connections(open_files)
    backlog = options["backlog"] or system_backlog()
    if worker is None:
        log.info(
            "open files limit: {limit}{raised}; each listener holds up to {n} connections",
            limit=open_files, raised=f" (raised from {before})" if before != open_files else "",
            n=max_connections,
        )  # fmt: skip
    timeouts = Timeouts(options["header-timeout"], options["idle-timeout"], options["body-min-rate"])
    # handlers on this machine keep their data API connection between appends
    data_timeouts = Timeouts(
        options["header-timeout"], options["idle-timeout"], options["body-min-rate"], idle_on_loopback=False
    )
    routes = RouteTable()
    governor = Governor(
        reactor,
        Limits(
            handler_timeout=options["handler-timeout"],
            kill_grace=options["kill-grace"],
            keep_running_on_disconnect=bool(options["keep-running-on-disconnect"]),
            shutdown_timeout=options["shutdown-timeout"],
        ),
    )
    service = KapowService(reactor, governor, options["shutdown-timeout"], worker=worker)
    metrics = Metrics(reactor) if options["metrics-bind"] else None
    containment = None
    if worker is None:  # first: everything started from here on is born inside
        containment = Containment(reactor)
        containment.setServiceParent(service)
    # the limits that hold across workers are decided here, in the main process (or the only one)
    server_queue = ServerQueue(options["max-handlers"], options["queue"], options["queue-timeout"])

    def endpoint(flag: str) -> tuple[Any, str | None]:
        description, host = parse_listen_address(options[flag])
        description = with_backlog(description, backlog)
        try:
            return serverFromString(reactor, description), host
        except LookupError as e:
            raise StartupError(
                f"--{flag} {options[flag]}: systemd passed no such socket "
                "(is its .socket unit active, with that FileDescriptorName=?)"
            ) from e
        except (ValueError, TypeError, AttributeError) as e:  # AttributeError: domain=BOGUS
            raise StartupError(f"--{flag} {options[flag]}: {e}") from e

    def listen(
        where: tuple[Any, str | None],
        site: Any,
        label: str,
        scheme: str,
        wrap: Any = None,
        kind: type = Listener,
    ) -> Any:
        found, host = where
        if wrap is not None:
            found = tls.tls_server_endpoint(found, wrap)
        if kind is Listener:  # (a HeldListener never accepts)
            site.protocol = guarded_protocol(
                data_timeouts if label == "data" else timeouts,
                reactor,
                tls=wrap is not None,
                # the data API's own, where it is served (not forwarded to workers)
                channel=DataChannel if isinstance(site.resource, DataAPI) else GuardedChannel,
            )
            found = ConnectionLimit(found, max_connections, label, reactor)
        svc = kind(found, site, label, scheme, host, worker)
        svc.setServiceParent(service)
        return svc

    user_tls = _user_tls(options)
    user_scheme = "https" if user_tls else "http"
    if user_tls is not None:
        service.reloads.append(lambda: _reload_user_tls(user_tls))
    service.reloads.append(lambda: _reload_auth(routes))
    launcher_dir = LauncherDirectory(
        None if options["data-client"] == "python" else native_client(),
        # init programs run in the main process: kapow route is theirs
        reactor if worker is None else None,
    )
    launcher_dir.setServiceParent(service)

    def serve_users(user_where: tuple[Any, str | None], admission: Any) -> UserAPI:
        """The user interface with its handlers: the same in a worker as in the whole server."""
        spawner = Spawner(
            reactor,
            lambda: launcher_dir.environ(os.environ),
            lambda: (data.url(), control_url()),
            debug=options["debug"],
            limited=LimitedCommand.find(native_client()),
            default_limits=options["limits"],
            threads=SPAWN_THREADS if worker is None else 0,
        )
        proxies = options["trusted-proxies"]
        user_api = UserAPI(
            routes,
            handlers,
            spawner,
            governor,
            admission,
            TrustedProxies(proxies) if proxies else None,
            metrics,
        )
        if metrics is not None:
            metrics.queued_now = user_api.queued_routes
        site = UserSite(user_api, worker=worker, metrics=metrics)
        service.user_listener = listen(user_where, site, "user", user_scheme, user_tls)
        return user_api

    handlers = HandlerRegistry() if worker is None else HandlerRegistry(worker_handler_ids(worker))
    if workers == 1:
        data_api = DataAPI(handlers).resource()
        data_site = QuietSite(data_api) if metrics is None else CountingQuietSite(data_api, metrics)
    else:  # every handler lives in a worker: --data-bind forwards to it
        data_site = QuietSite(
            DataProxy(reactor, lambda handler_id: pool.data_address(handler_id) if pool is not None else None)
        )

    if worker is not None:
        if not options["debug"] and pidfds_work():
            reactor.callWhenRunning(quiet_sigchld)
        adopted: Any = AdoptedStreamServerEndpoint(reactor, USER_FD, _socket_family(USER_FD))
        if options["bind"].startswith("haproxy:"):
            adopted = proxyEndpoint(adopted)
        gate = GatedEndpoint(adopted)
        link = WorkerLink(
            worker, routes, governor, service, gate, lambda: data.url(), metrics, service.reload
        )
        link.user_api = serve_users((gate, None), MainAdmission(governor, options["max-handlers"], link))
        data = listen(
            (serverFromString(reactor, with_backlog("tcp:0:interface=127.0.0.1", backlog)), None),
            data_site,
            "data",
            "http",
        )

        def control_url() -> str:
            return link.control_url

        factory = Factory()
        factory.buildProtocol = lambda addr: link  # type: ignore[method-assign]
        reactor.adoptStreamConnection(MAIN_FD, socket.AF_UNIX, factory)
        os.close(MAIN_FD)
        return service

    pool: WorkerPool | None = None
    user_api: UserAPI | None = None
    if workers == 1:
        user_api = serve_users(endpoint("bind"), LocalAdmission(governor, Slots(reactor, server_queue)))
    else:
        never_accepting = Factory()
        never_accepting.noisy = False
        held = listen(endpoint("bind"), never_accepting, "user", user_scheme, kind=HeldListener)
        service.user_listener = held

    reachable = _reachable_addr(options)
    creds = _control_credentials(options, reachable)
    control_site = Site(
        ControlAPI(
            routes=routes,
            stats=lambda: pool.stats() if pool is not None else {"handlers": governor.running()},
            publish=lambda: pool.publish() if pool is not None else None,
            handlers=user_api if user_api is not None else HandlersOfWorkers(lambda: pool),
        ).resource()
    )
    control_site.requestFactory = bounded_request_factory(CONTROL_MAX_BODY)
    # HTTP/1.1 only: its error reasons are status-line phrases, which HTTP/2 has not
    control_site.acceptableProtocols = lambda: [b"http/1.1"]  # type: ignore[method-assign]
    control = listen(
        endpoint("control-bind"), control_site, "control", "https", tls.control_server_options(creds)
    )
    data = listen(endpoint("data-bind"), data_site, "data", "http")
    if metrics is not None:
        metrics_site = QuietSite(
            MetricsResource(metrics, lambda: pool.metrics_snapshots() if pool is not None else [])
        )
        listen(endpoint("metrics-bind"), metrics_site, "metrics", "http")
    reactor.callWhenRunning(lambda: containment.watch(data.url()))

    explicit_reachable = options["control-reachable-addr"] is not None

    def control_url() -> str:
        if explicit_reachable:
            return f"https://{reachable}"
        return control.url(host=credentials.reachable_host(reachable))

    if workers > 1:
        pool = WorkerPool(
            reactor,
            workers,
            lambda number: ["-m", "kapow", "server", WORKER_OPTION, str(number), *options.argv],
            systemd.child_environ(os.environ),
            routes,
            held.fileno,
            control_url,
            server_queue,
            options["shutdown-timeout"] + options["kill-grace"] + STOP_MARGIN,
            governor.end_groups,
            containment,
        )
        pool.setServiceParent(service)
        service.reloads.append(pool.reload)
        service.serving = pool.serving
        service.hurry.append(pool.hurry)

    def init_environ() -> dict[str, str]:
        env = launcher_dir.environ(os.environ)
        env.setdefault("KAPOW_CONTROL_URL", control_url())
        env.setdefault("KAPOW_DATA_URL", data.url())
        env.update(credentials.credentials_environ(creds))
        return env

    watchdog = systemd.watchdog_service(reactor)
    if watchdog is not None:
        watchdog.setServiceParent(service)
    InitProgramsService(reactor, options["init_programs"], init_environ).setServiceParent(service)
    return service


def _reload_user_tls(user_tls: tls.ReloadableServerOptions) -> None:
    why = user_tls.reload()
    if why is None:
        log.info("user HTTPS: certificate and key loaded again, for new connections")
    else:
        log.error("user HTTPS: keeping the certificate in force: {why}", why=why)


def _reload_auth(routes: RouteTable) -> None:
    for route in routes.snapshot():
        if route.guard is not None:
            why = route.guard.reload()
            if why is not None:
                log.error("route {id}: keeping its auth files as they were: {why}", id=route.id, why=why)


def _socket_family(fd: int) -> int:
    """The address family of the socket ``fd``."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.family
    finally:
        sock.detach()


def makeService(options: Options) -> KapowService:
    """Entry point of the twistd/twist plugin."""
    from twisted.internet import reactor

    try:
        return build_service(options, reactor)
    except StartupError as e:
        fatal(str(e))
