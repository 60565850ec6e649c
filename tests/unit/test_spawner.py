"""
kapow.handlers.spawn against a fake IReactorProcess (the ``DummyProcessReactor``
pattern of Twisted's procmon tests): what the Spawner asks of the provider,
how a HandlerProtocol tells the handler's owner of the start, the output and
the exit; the choice of provider; and the pure parts of the providers (the
child's environment and file actions) and the ``--spawn`` option.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IProcessProtocol, IReactorProcess
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from zope.interface import implementer
from zope.interface.verify import verifyObject

from kapow.core.resource_limits import LimitedCommand
from kapow.handlers.fast_processes import FastProcesses, child_file_steps
from kapow.handlers.libc_spawn import SharedStrings, c_strings
from kapow.handlers.processes import Environ, ReactorProcesses
from kapow.handlers.spawn import HandlerProtocol, Spawner, SpawnError, exit_description, handler_processes
from kapow.server.options import Options

DATA_URL = "http://127.0.0.1:8082"
CONTROL_URL = "https://localhost:8081"


class DummyProcess:
    """What ``spawnProcess`` was asked for, and a child the test makes run, exit and end."""

    def __init__(
        self,
        protocol: IProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str],
        path: str | None,
        child_fds: Mapping[int, int | str],
        pid: int,
    ) -> None:
        self.proto = protocol
        self.executable = executable
        self.args = list(args)
        self.env = env
        self.path = path
        self.child_fds = dict(child_fds)
        self.given_pid = pid
        self.pid: int | None = None

    def run(self) -> None:
        self.pid = self.given_pid
        self.proto.makeConnection(self)  # type: ignore[arg-type]  # the part of a transport it reads

    def exit(self, code: int | None = 0, sig: int | None = None) -> None:
        self.pid = None
        reason = ProcessDone(0) if not code and sig is None else ProcessTerminated(code, sig)
        self.proto.processExited(Failure(reason))
        self.reason = reason

    def end(self) -> None:
        self.proto.processEnded(Failure(self.reason))

    def not_run(self, error: BaseException) -> None:
        self.proto.processEnded(Failure(error))


@implementer(IReactorProcess)
class DummyProcessReactor:
    """
    Records each spawn. Its children run at once (as a spawn in the reactor's
    thread), or when the test says (as one in a thread, ``at_once=False``),
    or exit at once too (``exit_at_once``); ``refuse`` is raised instead.
    """

    def __init__(self) -> None:
        self.processes: list[DummyProcess] = []
        self.at_once = True
        self.exit_at_once: int | None = None
        self.refuse: OSError | None = None

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: Any,
        args: Any,
        env: Any = None,
        path: Any = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Any = None,
    ) -> Any:
        if self.refuse is not None:
            raise self.refuse
        process = DummyProcess(
            processProtocol, executable, args, env, path, childFDs, 1000 + len(self.processes)
        )
        self.processes.append(process)
        if self.at_once:
            process.run()
            if self.exit_at_once is not None:
                process.exit(self.exit_at_once)
        return process


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def processes() -> DummyProcessReactor:
    return DummyProcessReactor()


@pytest.fixture
def spawner(clock: MemoryReactorClock, processes: DummyProcessReactor) -> Any:
    spawner = Spawner(
        clock,
        lambda: {"PATH": "/usr/bin:/bin", "KAPOW_CONTROL_CLIENT_KEY": "secret"},
        lambda: (DATA_URL, CONTROL_URL),
        processes=processes,
    )
    yield spawner
    spawner.close()


def exits_into(found: list[tuple[int | None, int | None]]) -> Any:
    return lambda status, sig: found.append((status, sig))


def result_of(deferred: Deferred[Any]) -> Any:
    found: list[Any] = []
    deferred.addBoth(found.append)
    assert found, "not fired"
    if isinstance(found[0], Failure):
        found[0].raiseException()
    return found[0]


# -- the Spawner ---------------------------------------------------------------------


def test_a_handler_is_spawned_with_its_environment_and_descriptors(
    spawner: Spawner, processes: DummyProcessReactor
) -> None:
    assert result_of(spawner.start("abc", ["/bin/sh", "-c", "true"], exits_into([]))) == 1000
    [process] = processes.processes
    assert (process.executable, process.args, process.path) == ("/bin/sh", ["/bin/sh", "-c", "true"], None)
    assert dict(process.env) == {
        "PATH": "/usr/bin:/bin",
        "KAPOW_HANDLER_ID": "abc",
        "KAPOW_DATA_URL": DATA_URL,
        "KAPOW_CONTROL_URL": CONTROL_URL,
    }
    assert isinstance(process.env, Environ)  # encoded once, for the fast provider
    devnull = process.child_fds[0]
    assert process.child_fds == {0: devnull, 1: devnull, 2: devnull}
    assert os.readlink(f"/proc/self/fd/{devnull}") == os.devnull
    assert isinstance(process.proto, HandlerProtocol) and process.proto.name == "abc"
    spawner.start("def", ["/bin/sh"], exits_into([]))
    assert processes.processes[1].child_fds[0] == devnull  # opened once


def test_debug_asks_for_pipes_and_stdin_is_the_given_descriptor(
    clock: MemoryReactorClock, processes: DummyProcessReactor
) -> None:
    spawner = Spawner(clock, dict, lambda: (DATA_URL, CONTROL_URL), processes=processes, debug=True)
    spawner.start("abc", ["prog"], exits_into([]), stdin=42)
    assert processes.processes[0].child_fds == {0: 42, 1: "r", 2: "r"}
    spawner.close()


def test_the_start_fires_with_the_pid_once_the_child_runs(
    spawner: Spawner, processes: DummyProcessReactor
) -> None:
    processes.at_once = False  # the spawn waits in a thread
    exits: list[tuple[int | None, int | None]] = []
    started = spawner.start("abc", ["prog"], exits_into(exits))
    assert not started.called
    processes.processes[0].run()
    assert result_of(started) == 1000
    processes.processes[0].exit(3)
    assert exits == [(3, None)]
    processes.processes[0].end()
    assert exits == [(3, None)]  # the end tells nothing more


def test_the_exit_status_and_signal_are_reported_at_exit(
    spawner: Spawner, processes: DummyProcessReactor
) -> None:
    exits: list[tuple[int | None, int | None]] = []
    for handler_id in ("a", "b", "c"):
        spawner.start(handler_id, ["prog"], exits_into(exits))
    processes.processes[0].exit(0)
    processes.processes[1].exit(7)
    processes.processes[2].exit(None, signal.SIGTERM)
    assert exits == [(0, None), (7, None), (None, signal.SIGTERM)]


def test_an_exit_while_the_start_is_answered_is_reported_in_the_next_turn(
    spawner: Spawner, processes: DummyProcessReactor, clock: MemoryReactorClock
) -> None:
    processes.exit_at_once = 4  # reaped inside spawnProcess, as Twisted's may
    exits: list[tuple[int | None, int | None]] = []
    started = spawner.start("abc", ["prog"], exits_into(exits))
    assert result_of(started) == 1000
    assert exits == []  # the owner has the start before the exit
    clock.advance(0)
    assert exits == [(4, None)]


def test_a_program_that_cannot_start(spawner: Spawner, processes: DummyProcessReactor) -> None:
    processes.refuse = FileNotFoundError(errno.ENOENT, "No such file or directory")
    exits: list[tuple[int | None, int | None]] = []
    with pytest.raises(SpawnError, match=r"^cannot run /no/such: No such file or directory$"):
        result_of(spawner.start("abc", ["/no/such"], exits_into(exits)))
    assert exits == []


def test_a_start_that_fails_in_a_thread(spawner: Spawner, processes: DummyProcessReactor) -> None:
    processes.at_once = False
    exits: list[tuple[int | None, int | None]] = []
    started = spawner.start("abc", ["/"], exits_into(exits))
    assert not started.called
    processes.processes[0].not_run(PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(SpawnError, match=r"^cannot run /: Permission denied$"):
        result_of(started)
    assert exits == []


@pytest.mark.parametrize("argv", [[], [""]])
def test_an_empty_entrypoint_is_never_spawned(
    spawner: Spawner, processes: DummyProcessReactor, argv: list[str]
) -> None:
    with pytest.raises(SpawnError, match=r"^empty entrypoint$"):
        result_of(spawner.start("abc", argv, exits_into([])))
    assert processes.processes == []


def test_limits_put_the_limiting_program_in_front(
    clock: MemoryReactorClock, processes: DummyProcessReactor
) -> None:
    spawner = Spawner(
        clock, dict, lambda: (DATA_URL, CONTROL_URL), processes=processes,
        limited=LimitedCommand("/opt/kapow", None), default_limits={"cpu": 10, "open_files": 50},
    )  # fmt: skip
    spawner.start("a", ["/bin/sh", "-c", "x"], exits_into([]), limits={"cpu": 3})
    spawner.start("b", ["/bin/sh", "-c", "x"], exits_into([]))
    assert [p.args for p in processes.processes] == [
        ["/opt/kapow", "--with-limits", "cpu=3", "open_files=50", "--", "/bin/sh", "-c", "x"],
        ["/opt/kapow", "--with-limits", "cpu=10", "open_files=50", "--", "/bin/sh", "-c", "x"],
    ]
    assert processes.processes[0].executable == "/opt/kapow"
    spawner.close()


def test_no_limits_no_program_in_front_and_none_without_a_way(
    spawner: Spawner, processes: DummyProcessReactor
) -> None:
    spawner.start("a", ["/bin/sh", "-c", "x"], exits_into([]))
    assert processes.processes[0].args == ["/bin/sh", "-c", "x"]
    with pytest.raises(SpawnError, match="native kapow client or prlimit"):
        result_of(spawner.start("b", ["/bin/sh"], exits_into([]), limits={"cpu": 1}))
    assert len(processes.processes) == 1


def test_threads_are_its_providers(clock: MemoryReactorClock) -> None:
    for processes, threads in (
        (FastProcesses(clock, 3), 3),
        (FastProcesses(clock, 0), 0),
        (ReactorProcesses(clock), 0),
    ):
        assert Spawner(clock, dict, lambda: (DATA_URL, CONTROL_URL), processes=processes).threads == threads


# -- the HandlerProtocol -------------------------------------------------------------


def test_output_is_logged_line_by_line_under_the_handler_id() -> None:
    events: list[Any] = []
    protocol = HandlerProtocol(
        "abc", exits_into([]), Logger(namespace="kapow.handlers.spawn", observer=events.append)
    )
    for fd, data in ((1, b"one\r\ntw"), (2, b"oops\n"), (1, b"o\n\nthree"), (2, b"half")):
        protocol.childDataReceived(fd, data)
    protocol.childConnectionLost(1)
    protocol.childConnectionLost(2)
    assert [formatEvent(e) for e in events] == [
        "abc: one", "abc (stderr): oops", "abc: two", "abc: ", "abc: three", "abc (stderr): half",
    ]  # fmt: skip
    assert {e["log_namespace"] for e in events} == {"kapow.handlers.spawn"}


def test_exit_descriptions() -> None:
    assert exit_description(Failure(ProcessDone(0))) == (0, None)
    assert exit_description(Failure(ProcessTerminated(2, None, 512))) == (2, None)
    assert exit_description(Failure(ProcessTerminated(None, signal.SIGKILL, 9))) == (None, signal.SIGKILL)
    assert exit_description(Failure(ProcessTerminated())) == (None, None)  # how is unknown


def test_a_protocol_ended_without_a_start_fails_its_start() -> None:
    exits: list[tuple[int | None, int | None]] = []
    protocol = HandlerProtocol("abc", exits_into(exits), Logger())
    protocol.processEnded(Failure(FileNotFoundError(errno.ENOENT, "No such file or directory")))
    with pytest.raises(FileNotFoundError):
        result_of(protocol.started)
    assert exits == []


# -- the provider ----------------------------------------------------------------------


def test_the_provider_named(clock: MemoryReactorClock, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(handler_processes(clock, "reactor"), ReactorProcesses)
    monkeypatch.setattr(FastProcesses, "unavailable", staticmethod(lambda: None))
    fast = handler_processes(clock, None, threads=2)
    assert isinstance(fast, FastProcesses) and fast.threads == 2
    assert isinstance(handler_processes(clock, "fast"), FastProcesses)
    assert verifyObject(IReactorProcess, fast) and verifyObject(IReactorProcess, ReactorProcesses(clock))


def test_without_the_fast_provider_the_reactors(
    clock: MemoryReactorClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[Any] = []
    monkeypatch.setattr(FastProcesses, "unavailable", staticmethod(lambda: "no pidfds here"))
    monkeypatch.setattr("kapow.handlers.spawn.log", Logger(observer=events.append))
    assert isinstance(handler_processes(clock), ReactorProcesses)
    assert [formatEvent(e) for e in events] == [
        "handlers are spawned from the reactor's thread: no pidfds here"
    ]
    with pytest.raises(ValueError, match="no pidfds here"):
        handler_processes(clock, "fast")


def test_the_spawn_option(monkeypatch: pytest.MonkeyPatch) -> None:
    def parsed(*args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    assert "spawn" not in parsed()  # the default: the fast provider where this system has it
    assert parsed("--spawn", "reactor")["spawn"] == "reactor"
    with pytest.raises(UsageError, match=r"^--spawn must be fast or reactor, not 'fork'$"):
        parsed("--spawn", "fork")
    monkeypatch.setattr(FastProcesses, "unavailable", staticmethod(lambda: "no pidfds here"))
    with pytest.raises(UsageError, match=r"^--spawn fast: not on this system: no pidfds here$"):
        parsed("--spawn", "fast")


# -- the child's environment and descriptors -----------------------------------------


def test_shared_strings_are_copied_with_the_rest_after_them() -> None:
    shared = SharedStrings([b"PATH=/bin", b"HOME=/h"])
    for more in ([b"KAPOW_HANDLER_ID=a"], [b"KAPOW_HANDLER_ID=b", b"X=1"], []):
        array = shared.followed_by(more)
        assert list(array) == [b"PATH=/bin", b"HOME=/h", *more, None]
    assert list(c_strings([b"a", b"b"])) == [b"a", b"b", None]


def test_an_environ_adding_a_variable_shares_the_rest() -> None:
    base = Environ({"PATH": "/bin", "HOME": "/h"})
    assert base.entries == [b"PATH=/bin", b"HOME=/h"]
    one = base.adding("KAPOW_HANDLER_ID", "a")
    assert one == {"PATH": "/bin", "HOME": "/h", "KAPOW_HANDLER_ID": "a"}
    assert one.entries == [b"PATH=/bin", b"HOME=/h", b"KAPOW_HANDLER_ID=a"]
    replaced = one.adding("PATH", "/usr/bin")
    assert replaced["PATH"] == "/usr/bin"
    assert sorted(replaced.entries) == [b"HOME=/h", b"KAPOW_HANDLER_ID=a", b"PATH=/usr/bin"]
    assert base == {"PATH": "/bin", "HOME": "/h"} and len(base.entries) == 2
    assert one.shared is base.shared and one.adding("X", "1").shared is base.shared  # encoded once


@pytest.mark.parametrize(
    "layout",
    [
        ((0, 7), (1, 7), (2, 7)),  # a handler: /dev/null everywhere
        ((0, 9), (1, 11), (2, 7)),  # stdin of its own, pipes
        ((0, 0), (1, 1), (2, 2)),  # this process's own
        ((0, 1), (1, 0), (2, 2)),  # swapped
        ((3, 0), (1, 5)),  # onto a high number, from a low one; no 0 and 2
        ((1, 1), (2, 2), (3, 7)),  # as the forkserver's
    ],
)
def test_file_actions_give_the_child_exactly_its_layout(layout: tuple[tuple[int, int], ...]) -> None:
    open_in_parent = {0, 1, 2, 5, 7, 9, 11}
    steps = child_file_steps(layout)
    fds = {fd: fd for fd in open_in_parent}
    for step in steps:
        if step[0] == os.POSIX_SPAWN_DUP2:
            assert step[1] in fds, f"{step}: reads a closed descriptor"
            fds[step[2]] = fds[step[1]]
        else:
            fds.pop(step[1], None)
    given = {fd: fds[fd] for fd in fds if fd in dict(layout) or fd <= 2}
    assert given == dict(layout)
    # what else is left open is what the exec closes: this process's own from 3 up
    left = {fd: fds[fd] for fd in set(fds) - set(dict(layout))}
    assert set(left) <= open_in_parent - {0, 1, 2}
    assert all(origin == fd for fd, origin in left.items()), left
