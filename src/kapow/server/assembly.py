"""
``makeService``: the ``kapow`` server assembled from its parsed options.

``twist kapow``, ``twistd kapow`` and ``kapow server`` all come through here
(docs/reference/cli.rst). :func:`build_service` wires what the ``make_*``
builders below return into one :class:`~kapow.server.service.KapowService`,
whose children start in this order:

- the whole server (``--workers 1``): the containment of its handlers, the
  launcher directory, the listeners of the user, control (mutual TLS), data
  and metrics interfaces, the systemd watchdog and the init programs;
- the main process of ``--workers N`` (docs/howto/scale-out.rst): the same,
  but its user listener only holds the socket its :class:`WorkerPool` hands
  to the workers, and its data listener forwards to them;
- one of those workers (the hidden ``--worker`` option): the launcher
  directory, the user listener on the socket handed over, a data listener of
  its own and the connection to the main process.

The options are read, checked and converted by :mod:`kapow.server.options`.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

from twisted.application.service import Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IProcessTransport,
    IReactorCore,
    IReactorProcess,
    IReactorThreads,
)
from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Site

from kapow.commands.launcher import native_client
from kapow.control.api import ControlAPI, NoHistory, Stats
from kapow.core import credentials
from kapow.core.metrics import Metrics
from kapow.core.resource_limits import LimitedCommand
from kapow.core.routes import RouteTable
from kapow.core.runs import RunRecord
from kapow.data.api import DataAPI
from kapow.data.handoff import HandedConnections, HandOffFactory, IHandOffReactor, adopter
from kapow.handlers.admission import Admission, LocalAdmission, ServerQueue, Slots
from kapow.handlers.containment import Containment
from kapow.handlers.fast_processes import SPAWN_THREADS, FastProcesses, quiet_sigchld
from kapow.handlers.governor import Governor, Limits
from kapow.handlers.handler import HandlerRegistry
from kapow.handlers.processes import ReactorProcesses
from kapow.handlers.rates import RateLimits, Rates
from kapow.handlers.spawn import Spawner, handler_processes
from kapow.history.base import HistoryError, Store, is_postgres_uri, shown_uri
from kapow.history.store import HistoryStore
from kapow.history.writer import HistoryWriter
from kapow.server import systemd
from kapow.server.forkserver import start_forkserver
from kapow.server.init_programs import InitProgramsService
from kapow.server.launcher_directory import LauncherDirectory
from kapow.server.listeners import Address, IListeningReactor, Listener, Listening, listener_named
from kapow.server.metrics_http import CountingQuietSite, MetricsResource, Others
from kapow.server.options import (
    HISTORY_OFF,
    WORKER_OPTION,
    Options,
    control_reachable_addr,
    history_path,
    usable_cpus,
)
from kapow.server.service import KapowService, StartupError, fatal
from kapow.server.workers.messages import DATA_FD, worker_handler_ids
from kapow.server.workers.pool import STOP_MARGIN, IWorkersReactor, WorkerPool
from kapow.server.workers.worker import (
    GatedEndpoint,
    HandedOverSocket,
    MainAdmission,
    MainJobs,
    MainProcessConnection,
    MainRates,
    RecordRelay,
    WorkerLink,
)
from kapow.user.api import UserAPI
from kapow.user.jobs import JobBook, Jobs
from kapow.user.proxies import TrustedProxies
from kapow.user.site import UserSite
from kapow.web import tls
from kapow.web.connections import (
    Timeouts,
    default_max_connections,
    raise_open_files_limit,
    system_backlog,
    with_backlog,
)
from kapow.web.errors import QuietSite, bounded_request_factory

__all__ = ["Host", "IServerReactor", "Options", "build_service", "makeService"]

log = Logger()

#: Largest request body the control API buffers (a route is a few hundred bytes).
CONTROL_MAX_BODY = 1024 * 1024


class IServerReactor(
    IWorkersReactor,  # IReactorProcess, IReactorSocket, IReactorTime
    IListeningReactor,  # IReactorTCP, IReactorUNIX, IReactorSocket, IReactorTime
    IReactorCore,
    IHandOffReactor,  # IReactorFDSet, IReactorTime
    IReactorThreads,  # IReactorFromThreads too
):
    """
    What the server needs of its reactor: it listens (TCP, Unix sockets,
    sockets handed over), spawns and watches processes, keeps time, takes
    work from signal handlers and spawning threads, and runs the history's
    reads in its thread pool.
    """


def make_own_processes(options: Options, reactor: IServerReactor) -> IReactorProcess:
    """
    Where the server's children other than its handlers come from: its
    reaper, its forkserver and its init programs. They are few, and spawned
    from the reactor's thread; with the fast provider (``--spawn``), each is
    reaped through its pidfd as handlers are, and no child of a server
    without workers needs ``SIGCHLD``.
    """
    if options.get("spawn") != "reactor" and FastProcesses.unavailable() is None:
        return FastProcesses(reactor, threads=0)
    return ReactorProcesses(reactor)


@dataclass(frozen=True)
class Host:
    """
    What the assembly does to its process and asks of the machine beyond
    the reactor; a test builds the whole server with its own.

    :ivar open_files: raises the open files limit; returns the limit now and the one before.
    :ivar backlog: the system's listen backlog.
    :ivar containment: makes the service that keeps the handlers from outliving
        the server (a cgroup of its own, and a reaper process).
    :ivar own_processes: makes the provider of the server's children other
        than its handlers.
    :ivar cpus: how many CPUs this process may use.
    """

    open_files: Callable[[], tuple[int, int]] = raise_open_files_limit
    backlog: Callable[[], int] = system_backlog
    containment: Callable[[IServerReactor, IReactorProcess], Containment] = Containment
    own_processes: Callable[[Options, IServerReactor], IReactorProcess] = make_own_processes
    cpus: Callable[[], int] = usable_cpus


#: The machine the server runs on, as it is.
THIS_HOST = Host()


def makeService(options: Options) -> KapowService:
    """Entry point of the twistd/twist plugin."""
    from twisted.internet import reactor

    try:
        # the installed reactor (epoll on Linux) provides every interface of IServerReactor
        return build_service(options, cast(IServerReactor, reactor))
    except StartupError as e:
        fatal(str(e))


def build_service(options: Options, reactor: IServerReactor, host: Host = THIS_HOST) -> KapowService:
    """
    Assemble the server from parsed ``options``: the whole server; or, with
    ``--workers N``, the main process (control API, route table, init
    programs, and N workers serving the user interface); or one of those
    workers (the hidden ``--worker`` option: :func:`build_worker`).

    Nothing listens, and no process starts, before the service starts.

    :raises StartupError: when a certificate, key or address is unusable.
    """
    if options["worker"] is not None:
        return build_worker(options, reactor, host)
    suggest_workers(options["workers"], host.cpus())
    history = make_history(options, reactor)
    own = host.own_processes(options, reactor)
    parts = make_parts(
        options,
        reactor,
        host,
        forkserver=partial(start_forkserver, own),
        history=None if history is None else history.add,
        own_processes=own,
    )
    service = make_kapow_service(parts)
    if history is not None:  # before the rest: it stops last, with the records of the last handlers
        history.setServiceParent(service)
        if parts.metrics is not None:
            parts.metrics.dropped_now = lambda: history.dropped
    containment = host.containment(reactor, own)
    containment.setServiceParent(service)  # first: everything started from here on is born inside
    parts.launcher.setServiceParent(service)
    user_address = parts.listening.endpoint("bind", options["bind"])
    reachable = control_reachable_addr(options)
    creds = make_control_credentials(options, reachable)
    urls = ServerURLs(service, reachable, explicit=options["control-reachable-addr"] is not None)
    # the limits that hold across workers are decided here, in the main process (or the only one)
    server_queue = ServerQueue(options["max-handlers"], options["queue"], options["queue-timeout"])
    if options["workers"] == 1:
        serving = serve_here(parts, user_address, urls.for_handlers, server_queue, history)
    else:
        serving = serve_in_workers(parts, user_address, urls.control, server_queue, containment, history)
    serving.user.setServiceParent(service)
    make_control_listener(parts, serving.control_api, creds).setServiceParent(service)
    written = options["write-control-credentials"]
    if written:  # right after the control API, whose real port its URL names
        ClientCredentialsFiles(creds, written, urls.control).setServiceParent(service)
    data = serving.data_listener(parts.listening.endpoint("data-bind", options["data-bind"]))
    data.setServiceParent(service)
    if parts.metrics is not None:
        make_metrics_listener(parts, parts.metrics, serving.other_metrics).setServiceParent(service)
    reactor.callWhenRunning(lambda: containment.watch(data.url()))
    if serving.pool is not None:
        add_workers(service, serving.pool)
    watchdog = systemd.watchdog_service(reactor)
    if watchdog is not None:
        watchdog.setName("watchdog")
        watchdog.setServiceParent(service)
    make_init_programs(parts, urls, creds).setServiceParent(service)
    return service


#: Beyond this many CPUs, a server of one process says that workers would use them.
WORKERS_WORTH_CPUS = 2


def suggest_workers(workers: int, cpus: int) -> None:
    """
    Say, on a machine of more than :data:`WORKERS_WORTH_CPUS` CPUs, that one
    process serves where ``--workers`` could use more. One is the default:
    on two CPUs a second worker serves no more (docs/howto/scale-out.rst).
    """
    if workers == 1 and cpus > WORKERS_WORTH_CPUS:
        log.info(
            "one process serves the user interface on {cpus} CPUs: --workers auto runs one per CPU",
            cpus=cpus,
        )


def build_worker(options: Options, reactor: IServerReactor, host: Host = THIS_HOST) -> KapowService:
    """
    Assemble worker number ``options["worker"]`` of ``--workers N``: the
    whole server without the control API and the init programs, serving the
    user interface on the socket the main process handed over, with a data
    API of its own.
    """
    number: int = options["worker"]
    # no forkserver: init programs, which run kapow route, are the main process's
    parts = make_parts(options, reactor, host, worker=number)
    keeps_history = history_path(options, os.environ) != HISTORY_OFF
    service = make_kapow_service(parts)
    parts.launcher.setServiceParent(service)
    handlers = HandlerRegistry(worker_handler_ids(number))
    own_port = with_backlog("tcp:0:interface=127.0.0.1", parts.listening.backlog)
    data_site = make_data_site(parts, handlers)
    data = make_data_listener(parts, Address(serverFromString(reactor, own_port), None), data_site)
    gate = GatedEndpoint(HandedOverSocket(reactor, proxied=options["bind"].startswith("haproxy:")))
    link = WorkerLink(
        number,
        routes=parts.routes,
        governor=parts.governor,
        service=service,
        user_endpoint=gate,
        data_url=data.url,
        metrics=parts.metrics,
    )
    # they need each other: admission asks the main process through the link,
    # which lists the user interface's handlers for the control API
    relay = RecordRelay(reactor, link)
    link.user_api = user_api = make_user_api(
        parts,
        handlers=handlers,
        admission=MainAdmission(parts.governor, options["max-handlers"], link),
        urls=link.handler_urls,
        history=relay.add if keeps_history else None,
        jobs=MainJobs(link),
        rates=MainRates(link, reactor),
    )
    make_user_listener(parts, Address(gate, None), user_api).setServiceParent(service)
    data.setServiceParent(service)
    HandedConnections(reactor, DATA_FD, adopter(reactor, data_site)).setServiceParent(service)
    MainProcessConnection(reactor, link).setServiceParent(service)
    relay.setServiceParent(service)  # after the connection: stopped before it, sending what is left
    return service


@dataclass(frozen=True)
class Parts:
    """What the builders of one process share."""

    options: Options
    reactor: IServerReactor
    listening: Listening
    routes: RouteTable
    governor: Governor
    #: the user interface's HTTPS settings, if it has any
    user_tls: tls.ReloadableServerOptions | None
    launcher: LauncherDirectory
    #: its counts, with --metrics-bind
    metrics: Metrics | None
    #: takes the run record of every handler whose process ended, if the history is kept
    history: Callable[[RunRecord], None] | None = None
    #: where the process's children other than handlers come from (:func:`make_own_processes`)
    own_processes: IReactorProcess | None = None


def make_parts(
    options: Options,
    reactor: IServerReactor,
    host: Host,
    *,
    worker: int | None = None,
    forkserver: Callable[[str], IProcessTransport] | None = None,
    history: Callable[[RunRecord], None] | None = None,
    own_processes: IReactorProcess | None = None,
) -> Parts:
    """
    The parts of the process (of worker number ``worker``), with a
    ``forkserver``, the ``history`` and the provider of its ``own_processes`` if given.
    """
    return Parts(
        options,
        reactor,
        listening=make_listening(options, reactor, host, worker),
        routes=RouteTable(),
        governor=make_governor(options, reactor),
        user_tls=make_user_tls(options),
        launcher=make_launcher_directory(options, forkserver),
        metrics=Metrics(reactor) if options["metrics-bind"] else None,
        history=history,
        own_processes=own_processes,
    )


def make_kapow_service(parts: Parts) -> KapowService:
    """The top of the service tree, reading certificates and auth files again on SIGHUP."""
    return KapowService(
        parts.reactor,
        parts.governor,
        parts.options["shutdown-timeout"],
        worker=parts.listening.worker,
        reloads=make_reloads(parts.routes, parts.user_tls),
    )


@dataclass(frozen=True)
class Serving:
    """
    What serves the user interface and runs the handlers, in this process
    or in its workers: the user listener, the control API over them, the
    maker of the data API's listener, and the pool of workers, if any.
    """

    user: Listener
    control_api: ControlAPI
    data_listener: Callable[[Address], Listener]
    pool: WorkerPool | None = None

    @property
    def other_metrics(self) -> Others:
        """The metrics of the other processes: the workers'."""
        return list if self.pool is None else self.pool.metrics_snapshots


def serve_here(
    parts: Parts,
    user_address: Address,
    urls: Callable[[], tuple[str, str]],
    server_queue: ServerQueue,
    history: HistoryWriter | None = None,
) -> Serving:
    """The user interface and its handlers in this process (``--workers 1``), with the ``history`` kept."""
    handlers = HandlerRegistry()
    user_api = make_user_api(
        parts,
        handlers=handlers,
        admission=LocalAdmission(parts.governor, Slots(parts.reactor, server_queue)),
        urls=urls,
        history=parts.history,
        jobs=Jobs(history),
    )
    return Serving(
        user=make_user_listener(parts, user_address, user_api),
        control_api=ControlAPI(
            routes=parts.routes,
            stats=partial(handler_stats, parts.governor),
            handlers=user_api,
            history=history or NoHistory(),
        ),
        data_listener=partial(make_data_listener, parts, site=make_data_site(parts, handlers)),
    )


def serve_in_workers(
    parts: Parts,
    user_address: Address,
    control_url: Callable[[], str],
    server_queue: ServerQueue,
    containment: Containment,
    history: HistoryWriter | None = None,
) -> Serving:
    """
    The user interface and its handlers in ``--workers N`` processes: this
    one holds the listening socket they accept on, hands the connections
    to its data API to them, shows their handlers on the control API, and keeps the ``history``
    of their handlers' runs.
    """
    held = parts.listening.held(user_address, https=parts.user_tls is not None)
    pool = make_worker_pool(
        parts,
        user_socket=held.fileno,
        control_url=control_url,
        server_queue=server_queue,
        containment=containment,
        jobs=Jobs(history),
    )
    return Serving(
        user=held,
        control_api=ControlAPI(
            routes=parts.routes,
            stats=pool.stats,
            publish=pool.publish,
            handlers=pool,
            history=history or NoHistory(),
        ),
        data_listener=partial(
            parts.listening.handing_over,
            HandOffFactory(pool.data_taker, parts.reactor, parts.listening.data_timeouts),
        ),
        pool=pool,
    )


def add_workers(service: KapowService, pool: WorkerPool) -> None:
    """The pool in the service tree: the server serves once they all do, reloads and hurries them too."""
    pool.setServiceParent(service)
    service.reloads.append(pool.reload)
    service.serving = pool.serving
    service.hurry.append(pool.hurry)


# -- the parts ----------------------------------------------------------------------


def make_listening(
    options: Options, reactor: IServerReactor, host: Host, worker: int | None = None
) -> Listening:
    """How this process listens: raises its open files limit to size its listeners' connections."""
    open_files, before = host.open_files()
    max_connections = options["max-connections"] or default_max_connections(open_files)
    backlog = options["backlog"] or host.backlog()
    if worker is None:
        log.info(
            "open files limit: {limit}{raised}; each listener holds up to {n} connections",
            limit=open_files, raised=f" (raised from {before})" if before != open_files else "",
            n=max_connections,
        )  # fmt: skip
    return Listening(
        reactor,
        backlog=backlog,
        max_connections=max_connections,
        timeouts=Timeouts(options["header-timeout"], options["idle-timeout"], options["body-min-rate"]),
        data_timeouts=Timeouts(
            options["header-timeout"],
            options["idle-timeout"],
            options["body-min-rate"],
            idle_on_loopback=False,
        ),
        worker=worker,
    )


def make_governor(options: Options, reactor: IServerReactor) -> Governor:
    """The governor of this process's handlers: their time limits, their end."""
    return Governor(
        reactor,
        Limits(
            handler_timeout=options["handler-timeout"],
            kill_grace=options["kill-grace"],
            keep_running_on_disconnect=bool(options["keep-running-on-disconnect"]),
            shutdown_timeout=options["shutdown-timeout"],
        ),
    )


def make_user_tls(options: Options) -> tls.ReloadableServerOptions | None:
    """The user interface's HTTPS settings (``--certfile``), if it has any."""
    if not options["certfile"]:
        return None
    cafile = options["clientcafile"]
    if options["clientauth"] and not cafile:
        cafile = ssl.get_default_verify_paths().cafile
        if cafile is None:
            raise StartupError("--clientauth: no system CA bundle found; give --clientcafile")
    try:
        return tls.ReloadableServerOptions(
            partial(tls.user_server_options, options["certfile"], options["keyfile"], cafile)
        )
    except credentials.CredentialsError as e:
        raise StartupError(f"user HTTPS: {e}") from e


def make_reloads(
    routes: RouteTable, user_tls: tls.ReloadableServerOptions | None
) -> list[Callable[[], None]]:
    """What SIGHUP reads again: the user interface's certificate and key, the routes' auth files."""
    reloads: list[Callable[[], None]] = []
    if user_tls is not None:
        reloads.append(partial(reload_user_tls, user_tls))
    reloads.append(partial(reload_auth, routes))
    return reloads


def reload_user_tls(user_tls: tls.ReloadableServerOptions) -> None:
    why = user_tls.reload()
    if why is None:
        log.info("user HTTPS: certificate and key loaded again, for new connections")
    else:
        log.error("user HTTPS: keeping the certificate in force: {why}", why=why)


def reload_auth(routes: RouteTable) -> None:
    for route in routes.snapshot():
        if route.guard is not None:
            why = route.guard.reload()
            if why is not None:
                log.error("route {id}: keeping its auth files as they were: {why}", id=route.id, why=why)


def make_control_credentials(options: Options, reachable: str) -> credentials.ControlCredentials:
    """The control API's pinned certificates: loaded, or made for ``reachable``."""
    try:
        if options["control-credentials"]:
            return credentials.load_control_credentials(options["control-credentials"])
        return credentials.generate_control_credentials(reachable)
    except (credentials.CredentialsError, OSError, ValueError) as e:
        raise StartupError(f"control credentials: {e}") from e


class ClientCredentialsFiles(Service):
    """
    Writes ``--write-control-credentials DIR``: the client credentials and
    the URL of the control API, once it listens (the port of
    ``--control-bind HOST:0`` is known only then), so that the directory
    alone reaches the server. A directory it cannot write stops the start.

    Like the listener before it, it starts in ``privilegedStartService`` when
    the runner calls that (twistd), else in ``startService`` (twist).

    :param control_url: the URL, read once the control API listens.
    """

    def __init__(
        self, creds: credentials.ControlCredentials, directory: str, control_url: Callable[[], str]
    ) -> None:
        self.creds = creds
        self.directory = directory
        self.control_url = control_url
        self.written = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._write()

    def startService(self) -> None:
        super().startService()
        if not self.written:
            self._write()

    def _write(self) -> None:
        try:
            credentials.write_client_credentials(self.creds, self.directory, self.control_url())
        except (credentials.CredentialsError, OSError) as e:
            raise StartupError(f"control credentials: {e}") from e
        self.written = True


def make_launcher_directory(
    options: Options, forkserver: Callable[[str], IProcessTransport] | None = None
) -> LauncherDirectory:
    """The ``kapow`` handlers and init programs run (``--data-client``), with a ``forkserver`` if given."""
    native = None if options["data-client"] == "python" else native_client()
    return LauncherDirectory(native, forkserver)


@dataclass(frozen=True)
class ServerURLs:
    """
    The URLs of the data and control APIs that handlers and init programs
    get: read from the listeners of ``service`` once they listen (the port
    of a ``:0`` address is known only then).

    :ivar reachable: the control API's ``HOST:PORT`` for them.
    :ivar explicit: whether ``reachable`` was given (``--control-reachable-addr``),
        rather than made from ``--control-bind``.
    """

    service: KapowService
    reachable: str
    explicit: bool

    def data(self) -> str:
        return listener_named(self.service, "data").url()

    def control(self) -> str:
        if self.explicit:
            return f"https://{self.reachable}"
        control = listener_named(self.service, "control")
        return control.url(host=credentials.reachable_host(self.reachable))

    def for_handlers(self) -> tuple[str, str]:
        """``(data URL, control URL)``."""
        return self.data(), self.control()


def make_handler_processes(parts: Parts) -> IReactorProcess:
    """
    Where handlers' processes come from (``--spawn``). A worker spawns in the
    reactor's thread (the other workers serve meanwhile). With the fast
    provider, each handler is reaped through its pidfd; where every other
    child is too (a worker, whose only children are its handlers, or a server
    without workers whose own children are fast: :func:`make_own_processes`),
    ``SIGCHLD`` need not wake the reactor at every handler's exit.
    """
    worker = parts.listening.worker is not None
    processes = handler_processes(
        parts.reactor, parts.options.get("spawn"), threads=0 if worker else SPAWN_THREADS
    )
    alone = worker or isinstance(parts.own_processes, FastProcesses)
    if alone and isinstance(processes, FastProcesses):
        parts.reactor.callWhenRunning(quiet_sigchld)
    return processes


def make_user_api(
    parts: Parts,
    *,
    handlers: HandlerRegistry,
    admission: Admission,
    urls: Callable[[], tuple[str, str]],
    history: Callable[[RunRecord], None] | None = None,
    jobs: JobBook | None = None,
    rates: RateLimits | None = None,
) -> UserAPI:
    """The user interface with its handlers: the same in a worker as in the whole server."""
    options, metrics = parts.options, parts.metrics
    spawner = Spawner(
        parts.reactor,
        partial(parts.launcher.environ, os.environ),
        urls,
        processes=make_handler_processes(parts),
        debug=options["debug"],
        limited=LimitedCommand.find(native_client()),
        default_limits=options["limits"],
    )
    proxies = options["trusted-proxies"]
    user_api = UserAPI(
        routes=parts.routes,
        handlers=handlers,
        spawner=spawner,
        governor=parts.governor,
        admission=admission,
        reactor=parts.reactor,
        proxies=TrustedProxies(proxies) if proxies else None,
        metrics=metrics,
        history=history,
        jobs=jobs or Jobs(None),
        jobs_path=options["jobs-path"],
        job_output_max=options["job-output-max"],
        server_name=options["server-name"],
        rates=rates or Rates(parts.reactor, parts.routes),
    )
    if metrics is not None:
        metrics.queued_now = user_api.queued_routes
    return user_api


def make_history(options: Options, reactor: IServerReactor) -> HistoryWriter | None:
    """
    The run history (``--history``, ``--history-keep``), written in a thread
    of its own; ``None`` with ``--history off``.

    :raises StartupError: if its database cannot be opened.
    """
    path = history_path(options, os.environ)
    if path == HISTORY_OFF:
        return None
    store: Store
    if path is not None and is_postgres_uri(path):
        # Imported here: a server that keeps its history in SQLite never loads the driver.
        from kapow.history.postgres import PostgresStore

        where = shown_uri(path)  # never its password
        try:
            store = PostgresStore.open(path)
        except HistoryError as e:
            raise StartupError(f"--history {where}: {e}") from None
        log.info("run history in PostgreSQL {where}", where=where)
    else:
        try:
            store = HistoryStore.open(path)
        except HistoryError as e:
            raise StartupError(f"--history {path}: {e}") from None
        log.info("run history in {where}", where=path or "memory")
    return HistoryWriter(store, options["history-keep"], reactor)


def make_user_listener(parts: Parts, address: Address, user_api: UserAPI) -> Listener:
    """The user interface's listener, with its access log."""
    site = UserSite(
        user_api.resource(), worker=parts.listening.worker, metrics=parts.metrics, reactor=parts.reactor
    )
    return parts.listening.listener(address, site, "user", tls_options=parts.user_tls)


def _http_1_1_only() -> list[bytes]:
    return [b"http/1.1"]


def handler_stats(governor: Governor) -> Stats:
    """The fields ``/health`` adds in a server of one process."""
    return {"handlers": governor.running()}


def make_control_listener(parts: Parts, api: ControlAPI, creds: credentials.ControlCredentials) -> Listener:
    """The control API's listener (``--control-bind``), behind mutual TLS pinned to ``creds``."""
    address = parts.listening.endpoint("control-bind", parts.options["control-bind"])
    site = Site(
        api.resource(), requestFactory=bounded_request_factory(CONTROL_MAX_BODY), reactor=parts.reactor
    )
    # HTTP/1.1 only: its error reasons are status-line phrases, which HTTP/2 has not
    site.acceptableProtocols = _http_1_1_only  # type: ignore[method-assign]  # this site's, not a subclass's: its log lines name twisted.web's Site
    return parts.listening.listener(address, site, "control", tls_options=tls.control_server_options(creds))


def make_data_site(parts: Parts, handlers: HandlerRegistry) -> Site:
    """The data API of this process's handlers."""
    resource: IResource = DataAPI(handlers).resource()
    if parts.metrics is None:
        return QuietSite(resource, reactor=parts.reactor)
    return CountingQuietSite(resource, parts.metrics, reactor=parts.reactor)


def make_data_listener(parts: Parts, address: Address, site: Site) -> Listener:
    """The data API's listener of this process's handlers."""
    return parts.listening.listener(address, site, "data", timeouts=parts.listening.data_timeouts)


def make_metrics_listener(parts: Parts, metrics: Metrics, others: Others) -> Listener:
    """``GET /metrics`` (``--metrics-bind``): this process's counts, and the ``others`` (the workers')."""
    address = parts.listening.endpoint("metrics-bind", parts.options["metrics-bind"])
    site = QuietSite(MetricsResource(metrics, others), reactor=parts.reactor)
    return parts.listening.listener(address, site, "metrics")


def worker_command(argv: list[str], number: int) -> list[str]:
    """The command line (after the interpreter) of worker ``number``: the server's, and ``--worker``."""
    return ["-m", "kapow", "server", WORKER_OPTION, str(number), *argv]


def make_worker_pool(
    parts: Parts,
    *,
    user_socket: Callable[[], int],
    control_url: Callable[[], str],
    server_queue: ServerQueue,
    containment: Containment,
    jobs: Jobs,
) -> WorkerPool:
    """The ``--workers`` processes serving the user interface on ``user_socket``, keeping their ``jobs``."""
    options = parts.options
    return WorkerPool(
        parts.reactor,
        count=options["workers"],
        command=partial(worker_command, options.argv),
        environ=systemd.child_environ(os.environ),
        routes=parts.routes,
        user_socket=user_socket,
        control_url=control_url,
        server_queue=server_queue,
        stop_timeout=options["shutdown-timeout"] + options["kill-grace"] + STOP_MARGIN,
        end_groups=parts.governor.end_groups,
        containment=containment,
        history=parts.history,
        jobs=jobs,
    )


def init_programs_environ(
    launcher: LauncherDirectory, urls: ServerURLs, creds: credentials.ControlCredentials
) -> dict[str, str]:
    """The environment of the init programs, once the listeners listen."""
    env = launcher.environ(os.environ)
    env.setdefault("KAPOW_CONTROL_URL", urls.control())
    env.setdefault("KAPOW_DATA_URL", urls.data())
    env.update(credentials.credentials_environ(creds))
    return env


def make_init_programs(
    parts: Parts, urls: ServerURLs, creds: credentials.ControlCredentials
) -> InitProgramsService:
    """The init programs, run once the server runs."""
    return InitProgramsService(
        parts.reactor,
        parts.options["init_programs"],
        partial(init_programs_environ, parts.launcher, urls, creds),
        processes=parts.own_processes,
        debug=bool(parts.options["debug"]),
    )
