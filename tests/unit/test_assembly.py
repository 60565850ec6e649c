"""
The whole assembly on a fake reactor (kapow.server.assembly.build_service):
which listeners, services and child processes it sets up for a server of
one process, for the main process of ``--workers 2`` and for one of its
workers; and that nothing touches the network, starts a process or changes
the test's process on the way.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Site

import kapow
from kapow.data.handoff import HandOffFactory
from kapow.data.resource import DataResource
from kapow.handlers.admission import LocalAdmission
from kapow.handlers.containment import Containment
from kapow.server.assembly import THIS_HOST, Host, Options, build_service
from kapow.server.launcher_directory import LauncherDirectory
from kapow.server.listeners import HeldListener, listener_named
from kapow.server.metrics_http import MetricsResource
from kapow.server.service import KapowService, StartupError
from kapow.server.workers.messages import worker_handler_ids
from kapow.server.workers.pool import WorkerPool
from kapow.server.workers.worker import (
    GatedEndpoint,
    HandedOverSocket,
    MainAdmission,
    MainProcessConnection,
    WorkerLink,
)
from kapow.user.api import UserAPI, UserResource
from kapow.web.connections import ConnectionLimit, default_max_connections, raise_open_files_limit

OPEN_FILES = 4096
BACKLOG = 77
HELD_FD = 99

ADDRESSES = [
    "--bind", "127.0.0.1:18080",
    "--control-bind", "localhost:18081",
    "--data-bind", "127.0.0.1:18082",
]  # fmt: skip


class FakeProcess:
    """What ``spawnProcess`` gave: the process's command line, environment and descriptors."""

    def __init__(
        self, executable: str, args: Sequence[str], env: Mapping[str, str], child_fds: dict, pid: int
    ) -> None:
        self.executable = executable
        self.args = list(args)
        self.env = dict(env)
        self.child_fds = child_fds
        self.pid = pid

    def closeStdin(self) -> None:
        pass

    def signalProcess(self, signal: object) -> None:
        pass


class FakePort:
    """A listening port on ``host:port``, whose socket is ``fileno``."""

    def __init__(self, host: str, port: int) -> None:
        self.address = IPv4Address("TCP", host, port)

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> None:
        pass

    def stopReading(self) -> None:
        pass

    def fileno(self) -> int:
        return HELD_FD


class FakeReactor(MemoryReactorClock):
    """
    A MemoryReactorClock that also "spawns" processes (it records them, as
    the ``DummyProcessReactor`` of Twisted's procmon tests does), gives ports
    with their real addresses, and connects the stream connections it adopts
    to a StringTransport.
    """

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: dict | None = None,
    ) -> FakeProcess:
        process = FakeProcess(executable, args, env or {}, dict(childFDs or {}), 1000 + len(self.processes))
        processProtocol.makeConnection(process)
        self.processes.append(process)
        return process

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> FakePort:
        super().listenTCP(port, factory, backlog, interface)
        return FakePort(interface or "0.0.0.0", port)

    def adoptStreamConnection(self, fileDescriptor: int, addressFamily: int, factory: Any) -> None:
        super().adoptStreamConnection(fileDescriptor, addressFamily, factory)
        factory.buildProtocol(None).makeConnection(StringTransport())


class FakeContainment(Containment):
    """Records what the real one would do to this process: a cgroup, a reaper process."""

    def __init__(self, reactor: Any, processes: Any) -> None:
        super().__init__(reactor, processes)
        self.events: list[Any] = []

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self.events.append("contained, reaper started")

    def startService(self) -> None:
        Service.startService(self)

    def watch(self, data_url: str) -> None:
        self.events.append(("watch", data_url))

    def enter_worker(self, number: int, pid: int) -> None:
        self.events.append(("worker", number, pid))


HOST = Host(
    open_files=lambda: (OPEN_FILES, 1024),
    backlog=lambda: BACKLOG,
    containment=FakeContainment,
    own_processes=lambda options, reactor: reactor,  # recorded, not run
)


@pytest.fixture(autouse=True)
def nothing_real(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No network socket, no process, no change to this process's limits; temporary files in tmp_path."""

    def refuse(what: str) -> Any:
        def refused(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"the assembly {what}")

        return refused

    opened = socket.socket.__init__

    def local_only(self: socket.socket, family: int = -1, *args: Any, **kwargs: Any) -> None:
        if family in (socket.AF_INET, socket.AF_INET6) or (family == -1 and kwargs.get("fileno") is None):
            raise AssertionError("the assembly opened a network socket")
        opened(self, family, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "__init__", local_only)
    for name in ("fork", "posix_spawn", "posix_spawnp", "execv", "execve"):
        monkeypatch.setattr(os, name, refuse("started a process"))
    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse("started a process"))
    monkeypatch.setattr(resource, "setrlimit", refuse("changed this process's limits"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    native = tmp_path / "native-kapow"
    native.write_bytes(b"\x7fELF")
    monkeypatch.setattr("kapow.server.assembly.native_client", lambda: str(native))
    yield


def options(*args: str) -> Options:
    parsed = Options()
    parsed.parseOptions([*ADDRESSES, *args])
    return parsed


def tree(service: KapowService) -> list[tuple[str, str | None]]:
    return [(type(child).__name__, child.name) for child in service]


def start(service: KapowService) -> None:
    service.privilegedStartService()
    service.startService()


def layers(factory: Any) -> list[str]:
    """The factories a listening port got, outermost first: TLS, the connection limit, the site."""
    found = []
    while True:
        if isinstance(factory, TLSMemoryBIOFactory):
            found.append("tls")
            factory = factory.wrappedFactory
        elif type(factory).__name__ == "_LimitedFactory":
            found.append(f"at most {factory._limit.limit}")
            factory = factory._factory
        else:
            return [*found, type(factory).__name__]


def listening(reactor: FakeReactor) -> list[tuple[str, int, int, list[str]]]:
    return [
        (interface, port, backlog, layers(factory))
        for port, factory, backlog, interface in reactor.tcpServers
    ]


def site_of(service: KapowService, label: str) -> Site:
    factory = listener_named(service, label).factory
    assert isinstance(factory, Site)
    return factory


def call(site: Site, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    treq = StubTreq(site.resource)
    data = None if body is None else json.dumps(body).encode()
    found: list[Any] = []
    treq.request(method, "http://control" + path, data=data).addCallback(
        lambda response: response.content().addCallback(
            lambda content: found.append((response.code, content))
        )
    )
    treq.flush()
    [(code, content)] = found
    return code, json.loads(content) if content else None


def forkserver_argv() -> list[str]:
    package = os.path.dirname(os.path.abspath(kapow.__file__))
    return [
        sys.executable,
        "-I",
        "-S",
        os.path.join(package, "commands", "forkserver.py"),
        os.path.dirname(package),
        "3",
    ]


MAX = f"at most {default_max_connections(OPEN_FILES)}"


def test_the_machine_as_it_is_by_default() -> None:
    assert (THIS_HOST.open_files, THIS_HOST.containment) == (raise_open_files_limit, Containment)


@pytest.mark.parametrize(
    ("args", "cpus", "said"),
    [((), 8, True), (("--workers", "2"), 8, False), ((), 2, False)],
)
def test_a_server_of_one_process_on_many_cpus_says_workers_would_use_them(
    args: tuple[str, ...], cpus: int, said: bool
) -> None:
    host = Host(
        open_files=HOST.open_files,
        backlog=HOST.backlog,
        containment=FakeContainment,
        own_processes=HOST.own_processes,
        cpus=lambda: cpus,
    )
    with capturedLogs() as events:
        build_service(options(*args), FakeReactor(), host)
    told = [formatEvent(e) for e in events if "--workers auto" in formatEvent(e)]
    assert told == (
        [f"one process serves the user interface on {cpus} CPUs: --workers auto runs one per CPU"]
        if said
        else []
    )


def test_a_server_of_one_process(tmp_path: Path) -> None:
    init = tmp_path / "init.pow"
    init.write_text("#!/bin/sh\n")
    init.chmod(0o755)
    reactor = FakeReactor()
    service = build_service(options("--metrics-bind", "127.0.0.1:19090", str(init)), reactor, HOST)

    assert tree(service) == [
        ("HistoryWriter", "history"),
        ("FakeContainment", "containment"),
        ("LauncherDirectory", "launcher"),
        ("Listener", "user"),
        ("Listener", "control"),
        ("Listener", "data"),
        ("Listener", "metrics"),
        ("InitProgramsService", "init-programs"),
    ]
    assert (reactor.tcpServers, reactor.processes) == ([], [])  # nothing before the start

    start(service)
    containment = service.getServiceNamed("containment")
    assert containment.events == ["contained, reaper started"]
    assert listening(reactor) == [
        ("127.0.0.1", 18080, BACKLOG, [MAX, "UserSite"]),
        ("localhost", 18081, BACKLOG, ["tls", MAX, "Site"]),
        ("127.0.0.1", 18082, BACKLOG, [MAX, "CountingQuietSite"]),  # counted: --metrics-bind
        ("127.0.0.1", 19090, BACKLOG, [MAX, "QuietSite"]),
    ]
    assert [process.args for process in reactor.processes] == [forkserver_argv()]
    assert reactor.processes[0].child_fds[0] == "w"  # its end: the server closes its stdin

    user_resource = site_of(service, "user").resource
    assert isinstance(user_resource, UserResource)
    user_api = user_resource.api
    assert isinstance(user_api, UserAPI) and isinstance(user_api.admission, LocalAdmission)
    assert isinstance(site_of(service, "data").resource, DataResource)
    assert isinstance(site_of(service, "metrics").resource, MetricsResource)
    assert user_api.spawner.urls() == ("http://127.0.0.1:18082", "https://localhost:18081")

    # the control API changes the table the user interface serves, and lists its handlers
    control = site_of(service, "control")
    assert (
        call(control, "POST", "/routes", {"method": "GET", "url_pattern": "/x", "command": "true"})[0] == 201
    )
    assert [route.url_pattern for route in user_api.routes.snapshot()] == ["/x"]
    assert call(control, "GET", "/health") == (200, {"status": "ok", "routes": 1, "handlers": 0})
    assert call(control, "GET", "/handlers") == (200, [])

    reactor.run()  # what waits for the reactor: containment learns the data URL, init programs start
    assert containment.events[1:] == [("watch", "http://127.0.0.1:18082")]
    [_, program] = reactor.processes
    assert program.args == [str(init)]
    assert (program.env["KAPOW_CONTROL_URL"], program.env["KAPOW_DATA_URL"]) == (
        "https://localhost:18081",
        "http://127.0.0.1:18082",
    )
    assert {"KAPOW_CONTROL_SERVER_CERT", "KAPOW_CONTROL_CLIENT_CERT", "KAPOW_CONTROL_CLIENT_KEY"} <= set(
        program.env
    )
    assert program.env["PATH"].split(os.pathsep)[0] == service.getServiceNamed("launcher").path


def test_the_main_process_of_two_workers() -> None:
    reactor = FakeReactor()
    parsed = options("--workers", "2", "--max-connections", "64")
    service = build_service(parsed, reactor, HOST)

    assert tree(service) == [
        ("HistoryWriter", "history"),
        ("FakeContainment", "containment"),
        ("LauncherDirectory", "launcher"),
        ("HeldListener", "user"),
        ("Listener", "control"),
        ("Listener", "data"),
        ("WorkerPool", "workers"),
        ("InitProgramsService", "init-programs"),
    ]
    assert (reactor.tcpServers, reactor.processes) == ([], [])

    start(service)
    assert listening(reactor) == [
        ("127.0.0.1", 18080, BACKLOG, ["Factory"]),  # held for the workers, never accepted on here
        ("localhost", 18081, BACKLOG, ["tls", "at most 64", "Site"]),
        ("127.0.0.1", 18082, BACKLOG, ["at most 64", "HandOffFactory"]),
    ]
    # each connection handed to the worker of its handler
    assert isinstance(listener_named(service, "data").factory, HandOffFactory)
    forkserver, *workers = reactor.processes
    assert forkserver.args == forkserver_argv()
    assert [worker.args for worker in workers] == [
        [sys.executable, "-m", "kapow", "server", "--worker", str(n), *parsed.argv] for n in (1, 2)
    ]
    assert [sorted(worker.child_fds) for worker in workers] == [[0, 1, 2, 3, 4, 5]] * 2
    assert {worker.child_fds[3] for worker in workers} == {HELD_FD}  # the user interface's socket
    containment = service.getServiceNamed("containment")
    assert containment.events == [
        "contained, reaper started",
        ("worker", 1, workers[0].pid),
        ("worker", 2, workers[1].pid),
    ]

    pool = service.getServiceNamed("workers")
    assert isinstance(pool, WorkerPool) and sorted(pool.workers) == [1, 2]
    assert isinstance(listener_named(service, "user"), HeldListener)
    assert service.serving == pool.serving and service.hurry == [pool.hurry]
    assert service.reloads[-1] == pool.reload
    control = site_of(service, "control")
    assert call(control, "GET", "/health") == (
        200,
        {"status": "ok", "routes": 0, "handlers": 0, "workers": 0},
    )
    assert call(control, "GET", "/handlers") == (200, [])
    # a --data-bind connection goes to the worker of its handler, once it serves; any serving worker's for no handler
    of_one, of_two = worker_handler_ids(1)(), worker_handler_ids(2)()
    assert [pool.data_taker(i) for i in ("", of_one, of_two)] == [None, None, None]
    pool.workers[2].serving.callback(None)
    taker = pool.workers[2].take_data
    assert [pool.data_taker(i) for i in ("", of_one, of_two, "0009" + of_two[4:])] == [
        taker,
        None,
        taker,
        None,
    ]


def test_one_worker_of_them() -> None:
    reactor = FakeReactor()
    service = build_service(
        options("--workers", "2", "--worker", "1", "--bind", "haproxy:127.0.0.1:18080"), reactor, HOST
    )

    assert tree(service) == [
        ("LauncherDirectory", "launcher"),
        ("Listener", "user"),
        ("Listener", "data"),
        ("HandedConnections", "data-handoff"),
        ("MainProcessConnection", "main-process"),
        ("RecordRelay", "history-relay"),
    ]
    assert (reactor.tcpServers, reactor.adoptedPorts, reactor.processes) == ([], [], [])
    launcher = service.getServiceNamed("launcher")
    assert isinstance(launcher, LauncherDirectory) and launcher.start_forkserver is None

    user, data = listener_named(service, "user"), listener_named(service, "data")
    user.privilegedStartService()
    data.privilegedStartService()
    # its own data API on a port of its own; the user interface waits for the routes
    assert listening(reactor) == [("127.0.0.1", 0, BACKLOG, [MAX, "QuietSite"])]
    assert isinstance(site_of(service, "data").resource, DataResource)
    assert reactor.adoptedPorts == []
    limited = user.endpoint
    assert isinstance(limited, ConnectionLimit) and isinstance(limited.endpoint, GatedEndpoint)
    handed_over = limited.endpoint.endpoint
    assert isinstance(handed_over, HandedOverSocket)
    assert (handed_over.fd, handed_over.proxied) == (3, True)

    connection = service.getServiceNamed("main-process")
    assert isinstance(connection, MainProcessConnection) and connection.fd == 4
    link = connection.link
    assert isinstance(link, WorkerLink) and link.service is service
    user_resource = site_of(service, "user").resource
    assert isinstance(user_resource, UserResource)
    user_api = user_resource.api
    assert link.user_api is user_api
    assert isinstance(user_api.admission, MainAdmission) and user_api.admission.link is link
    assert user_api.spawner.threads == 0
    link.control_url = "https://localhost:18081"
    assert user_api.spawner.urls() == (data.url(), "https://localhost:18081") == link.handler_urls()


@pytest.mark.parametrize(
    ("flag", "address", "why"),
    [
        (
            "--data-bind",
            "systemd:domain=INET:name=nosuch",
            "systemd passed no such socket (is its .socket unit active, with that FileDescriptorName=?)",
        ),
        ("--control-bind", "systemd:domain=BOGUS:index=0", "BOGUS"),
    ],
)
def test_an_endpoint_the_reactor_cannot_make_is_one_line(flag: str, address: str, why: str) -> None:
    with pytest.raises(StartupError) as caught:
        build_service(options(flag, address), FakeReactor(), HOST)
    assert str(caught.value).startswith(f"{flag} {address}: ") and why in str(caught.value)
    assert "\n" not in str(caught.value)
