"""
Tests for kapow.handlers.spawn with real processes and the real reactor: the
Spawner through each provider of processes (the handler environment, output
logged or discarded, stdin, exit and signal, an exit at once, start failures,
spawning threads, resource limits), ending process groups, and the private
hook of Twisted that :class:`~kapow.handlers.processes.GroupProcess`
overrides. The providers' own protocol cases are in test_processes.py.
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import process as _process
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from kapow.commands.launcher import native_client
from kapow.core.resource_limits import LimitedCommand
from kapow.handlers.fast_processes import FastProcesses, quiet_sigchld
from kapow.handlers.processes import GroupProcess, ReactorProcesses
from kapow.handlers.spawn import Spawner, SpawnError, signal_group
from tests.support.processes import children_gone, reactor_running

SH = "/bin/sh"
DATA_URL = "http://localhost:8082"
CONTROL_URL = "https://localhost:8081"


def fast_processes(threads: int = 4) -> FastProcesses:
    why = FastProcesses.unavailable()
    if why is not None:
        raise SkipTest(why)
    return FastProcesses(reactor, threads)


#: How each provider is made, by the name ``--spawn`` gives it.
PROVIDERS = {"fast": fast_processes, "reactor": lambda: ReactorProcesses(reactor)}


class GroupProcessTests(TestCase):
    """What GroupProcess relies on in Twisted, and how it behaves there."""

    timeout = 20

    def setUp(self) -> Deferred[None]:
        return reactor_running()

    def test_the_private_hook_it_overrides_is_there(self) -> None:
        hook = _process.Process._trySpawnInsteadOfFork
        self.assertEqual(
            list(inspect.signature(hook).parameters),
            list(inspect.signature(GroupProcess._trySpawnInsteadOfFork).parameters),
        )
        self.assertIn("_trySpawnInsteadOfFork", inspect.getsource(_process._BaseProcess._fork))
        self.assertTrue(callable(_process._getFileActions))
        self.assertEqual((_process._PS_CLOSE, _process._PS_DUP2), (os.POSIX_SPAWN_CLOSE, os.POSIX_SPAWN_DUP2))

    async def test_a_child_started_through_it_leads_its_group(self) -> None:
        spawner = Spawner(
            reactor, lambda: {}, lambda: (DATA_URL, CONTROL_URL), processes=ReactorProcesses(reactor)
        )
        self.addCleanup(spawner.close)
        exited: Deferred[tuple[Any, Any]] = Deferred()
        pgid = await spawner.start("h1", [SH, "-c", "sleep 30"], lambda *how: exited.callback(how))
        self.addCleanup(signal_group, pgid, signal.SIGKILL)
        self.assertIsInstance(_process.reapProcessHandlers[pgid], GroupProcess)
        with open(f"/proc/{pgid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        self.assertEqual((int(fields[2]), int(fields[3])), (pgid, os.getsid(0)))  # its group, this session
        signal_group(pgid, signal.SIGKILL)
        self.assertEqual(await exited, (None, signal.SIGKILL))

    async def test_start_returns_the_group_of_a_child_that_exits_at_once(self) -> None:
        register = _process.registerReapProcessHandler

        def register_after_exit(pid: int, process: Any) -> None:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            register(pid, process)  # reaps it there and then, before spawnProcess returns

        self.patch(_process, "registerReapProcessHandler", register_after_exit)
        spawner = Spawner(
            reactor, lambda: {}, lambda: (DATA_URL, CONTROL_URL), processes=ReactorProcesses(reactor)
        )
        self.addCleanup(spawner.close)
        exits: list[Any] = []
        started = spawner.start("h5", [SH, "-c", "exit 0"], lambda *how: exits.append(how))
        self.assertIsInstance(self.successResultOf(started), int)
        self.assertEqual(exits, [])
        await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(exits, [(0, None)])


class SpawnerTests:
    """The Spawner's cases, with the provider a subclass names."""

    timeout = 20
    provider = "fast"

    def setUp(self) -> Deferred[None]:
        self.addCleanup(children_gone)  # last: once the tests' groups are killed
        return reactor_running()

    def processes(self) -> IReactorProcess:
        return PROVIDERS[self.provider]()

    def spawner(self, base: dict[str, str], debug: bool = False) -> Spawner:
        spawner = Spawner(
            reactor, lambda: base, lambda: (DATA_URL, CONTROL_URL), processes=self.processes(), debug=debug
        )
        self.addCleanup(spawner.close)
        return spawner

    async def run_handler(
        self, spawner: Spawner, handler_id: str, script: str, lines_expected: int = 0
    ) -> tuple[Any, list[str]]:
        """
        Run ``script`` as handler ``handler_id``: (exit status, signal) and
        the lines logged for it (waiting for ``lines_expected`` of them).
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        exited: Deferred[tuple[Any, Any]] = Deferred()
        pgid = await spawner.start(handler_id, [SH, "-c", script], lambda *how: exited.callback(how))
        self.addCleanup(signal_group, pgid, signal.SIGKILL)
        how = await exited

        def lines() -> list[str]:
            return [formatEvent(e) for e in events if e.get("name") == handler_id]

        deadline = time.monotonic() + 5
        while len(lines()) < lines_expected:
            assert time.monotonic() < deadline, lines()
            await deferLater(reactor, 0.01, lambda: None)
        return how, lines()

    async def test_debug_logs_output_tagged_with_the_handler(self) -> None:
        spawner = self.spawner(
            {
                "PATH": os.environ["PATH"],
                "KAPOW_CONTROL_CLIENT_KEY": "secret key",
                "KAPOW_CONTROL_SERVER_CERT": "cert",
            },
            debug=True,
        )
        how, lines = await self.run_handler(
            spawner,
            "h1",
            'echo "id=$KAPOW_HANDLER_ID data=$KAPOW_DATA_URL control=$KAPOW_CONTROL_URL";'
            ' echo "key=${KAPOW_CONTROL_CLIENT_KEY-unset} cert=${KAPOW_CONTROL_SERVER_CERT-unset}";'
            " echo oops >&2; cat; printf 'no newline'; echo the end >&2; exit 3",
            lines_expected=5,
        )
        assert how == (3, None)
        assert sorted(lines) == sorted(
            [
                f"h1: id=h1 data={DATA_URL} control={CONTROL_URL}",
                "h1: key=unset cert=unset",
                "h1 (stderr): oops",
                "h1: no newline",
                "h1 (stderr): the end",
            ]
        )
        assert lines.index("h1 (stderr): oops") < lines.index("h1 (stderr): the end")

    async def test_output_discarded_without_debug(self) -> None:
        spawner = self.spawner({"PATH": os.environ["PATH"]})
        how, lines = await self.run_handler(spawner, "h2", "echo out; echo err >&2; echo the end")
        assert how == (0, None)
        await deferLater(reactor, 0.05, lambda: None)
        assert lines == []

    async def test_handlers_get_no_descriptor_but_0_1_2(self) -> None:
        # inherited without close-on-exec (as systemd's sockets are) before the first spawn
        inherited = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, inherited)
        os.set_inheritable(inherited, True)
        for debug in (True, False):
            spawner = self.spawner({"PATH": os.environ["PATH"]}, debug=debug)
            for handler_id in ("h5", "h6"):
                exited: Deferred[tuple[Any, Any]] = Deferred()
                pid = await spawner.start(
                    handler_id, [SH, "-c", "exec sleep 30"], lambda *how, d=exited: d.callback(how)
                )
                self.addCleanup(signal_group, pid, signal.SIGKILL)
                # its exec is done once it runs sleep and the close-on-exec descriptors are closed
                # (the kernel shows the new program a moment before): a descriptor it inherited stays
                deadline = time.monotonic() + 2
                while (
                    b"sleep" not in Path(f"/proc/{pid}/cmdline").read_bytes()
                    or sorted(map(int, os.listdir(f"/proc/{pid}/fd"))) != [0, 1, 2]
                ) and time.monotonic() < deadline:
                    await deferLater(reactor, 0.01, lambda: None)
                assert sorted(map(int, os.listdir(f"/proc/{pid}/fd"))) == [0, 1, 2], f"debug={debug}"
                signal_group(pid, signal.SIGKILL)
                await exited
        assert not os.get_inheritable(inherited)

    async def test_stdin_is_the_given_descriptor_else_empty(self) -> None:
        for debug, beside in ((False, False), (False, True), (True, False), (True, True)):
            spawner = self.spawner({"PATH": os.environ["PATH"]}, debug=debug)
            if beside:  # a live handler: the fast provider's spawns go through a thread
                live_exit: Deferred[tuple[Any, Any]] = Deferred()
                live = await spawner.start(
                    "h6", [SH, "-c", "sleep 30"], lambda *how, d=live_exit: d.callback(how)
                )
                self.addCleanup(signal_group, live, signal.SIGKILL)
            with tempfile.TemporaryFile() as body:
                body.write(b"the body\n")
                body.seek(0)
                results = []
                for stdin in (body.fileno(), None):
                    exited: Deferred[tuple[Any, Any]] = Deferred()
                    script = '[ "$(cat)" = "the body" ] && exit 3; exit 4'
                    pgid = await spawner.start(
                        "h7", [SH, "-c", script], lambda *how, d=exited: d.callback(how), stdin
                    )
                    self.addCleanup(signal_group, pgid, signal.SIGKILL)
                    results.append(await exited)
            assert results == [(3, None), (4, None)], f"debug={debug} beside={beside}"
            if beside:
                signal_group(live, signal.SIGKILL)
                await live_exit

    async def test_killed_handler_reports_the_signal(self) -> None:
        spawner = self.spawner({"PATH": os.environ["PATH"]})
        exited: Deferred[tuple[Any, Any]] = Deferred()
        pgid = await spawner.start("h3", [SH, "-c", "sleep 30"], lambda *how: exited.callback(how))
        self.addCleanup(signal_group, pgid, signal.SIGKILL)
        assert signal_group(pgid, signal.SIGTERM)
        assert await exited == (None, signal.SIGTERM)

    async def test_signal_group_after_the_group_is_gone(self) -> None:
        spawner = self.spawner({})
        exited: Deferred[tuple[Any, Any]] = Deferred()
        pgid = await spawner.start("h3", [SH, "-c", "exit 0"], lambda *how: exited.callback(how))
        assert await exited == (0, None)  # reaped: its only member
        assert not signal_group(pgid, signal.SIGTERM)
        assert not signal_group(pgid, 0)

    async def test_an_exit_at_once_is_reported_after_start_returns(self) -> None:
        for debug in (False, True):
            spawner = self.spawner({}, debug=debug)
            exited: Deferred[tuple[Any, Any]] = Deferred()
            started = spawner.start("h7", [SH, "-c", "exit 7"], lambda *how, d=exited: d.callback(how))

            def gone(pgid: int, exited: Deferred[Any] = exited) -> int:
                time.sleep(0.05)  # gone before the reactor turns again
                assert not exited.called
                return pgid

            pgid = await started.addCallback(gone)
            assert not exited.called
            assert await exited == (7, None)
            assert not os.path.exists(f"/proc/{pgid}"), "reaped, no zombie left"

    async def test_start_failure(self) -> None:
        for debug in (False, True):
            spawner = self.spawner({}, debug=debug)
            for argv, why in (
                (["/nonexistent/prog"], "cannot run /nonexistent/prog: No such file or directory"),
                (["/"], "cannot run /: Permission denied"),
                ([], "empty entrypoint"),
                ([""], "empty entrypoint"),
            ):
                try:
                    await spawner.start("h4", argv, lambda *how: None)
                except SpawnError as e:
                    assert str(e) == why
                else:
                    raise AssertionError(f"{argv} started")


class FastSpawnerTests(SpawnerTests, TestCase):
    provider = "fast"

    async def test_handlers_without_output_are_watched_through_a_pidfd(self) -> None:
        spawner = self.spawner({})
        exited: Deferred[tuple[Any, Any]] = Deferred()
        pgid = await spawner.start("h8", [SH, "-c", "sleep 5"], lambda *how: exited.callback(how))
        self.assertNotIn(pgid, _process.reapProcessHandlers)  # no Process object, no SIGCHLD scan
        signal_group(pgid, signal.SIGKILL)
        self.assertEqual(await exited, (None, signal.SIGKILL))

    async def test_handlers_watched_with_sigchld_at_its_default(self) -> None:
        """A worker's SIGCHLD at its default: no wake-up, handlers still reaped with their status."""
        before = signal.getsignal(signal.SIGCHLD)

        def restore() -> None:  # the reactor's, as it set it
            signal.signal(signal.SIGCHLD, before)
            signal.siginterrupt(signal.SIGCHLD, False)

        self.addCleanup(restore)
        quiet_sigchld()
        self.assertEqual(signal.getsignal(signal.SIGCHLD), signal.SIG_DFL)
        for debug in (False, True):
            spawner = self.spawner({}, debug=debug)
            exited: Deferred[tuple[Any, Any]] = Deferred()
            pgid = await spawner.start("h9", [SH, "-c", "exit 3"], lambda *how, d=exited: d.callback(how))
            self.assertEqual(await exited, (3, None))
            self.assertFalse(os.path.exists(f"/proc/{pgid}"), "reaped, no zombie left")

    async def test_a_spawn_beside_live_handlers_leaves_the_reactor_free(self) -> None:
        """Alone, a handler is spawned at once; beside a live one, the spawn
        waits in a spawning thread, not in the reactor."""
        spawner = self.spawner({})
        first_exit: Deferred[tuple[Any, Any]] = Deferred()
        first = spawner.start("h10", [SH, "-c", "sleep 30"], lambda *how: first_exit.callback(how))
        pgid = self.successResultOf(first)
        self.addCleanup(signal_group, pgid, signal.SIGKILL)
        second_exit: Deferred[tuple[Any, Any]] = Deferred()
        second = spawner.start("h11", [SH, "-c", "exit 4"], lambda *how: second_exit.callback(how))
        self.assertFalse(second.called)
        self.assertIsInstance(await second, int)
        self.assertEqual(await second_exit, (4, None))
        signal_group(pgid, signal.SIGKILL)
        self.assertEqual(await first_exit, (None, signal.SIGKILL))
        # alone again: at once
        third_exit: Deferred[tuple[Any, Any]] = Deferred()
        third = spawner.start("h12", [SH, "-c", "exit 0"], lambda *how: third_exit.callback(how))
        self.assertIsInstance(self.successResultOf(third), int)
        self.assertEqual(await third_exit, (0, None))

    async def test_without_threads_every_spawn_is_at_once(self) -> None:
        """As in a worker of --workers: beside a live handler too."""
        processes = fast_processes(threads=0)
        spawner = Spawner(reactor, dict, lambda: (DATA_URL, CONTROL_URL), processes=processes)
        self.addCleanup(spawner.close)
        self.assertEqual(spawner.threads, 0)
        exits: list[Deferred[tuple[Any, Any]]] = [Deferred(), Deferred()]
        pgids = []
        for handler_id, script, done in (("h15", "sleep 30", exits[0]), ("h16", "exit 5", exits[1])):
            started = spawner.start(handler_id, [SH, "-c", script], lambda *how, d=done: d.callback(how))
            pgids.append(self.successResultOf(started))
            self.addCleanup(signal_group, pgids[-1], signal.SIGKILL)
        self.assertEqual(await exits[1], (5, None))
        signal_group(pgids[0], signal.SIGKILL)
        self.assertEqual(await exits[0], (None, signal.SIGKILL))
        self.assertIsNone(processes._spawn_threads)

    async def test_a_spawn_in_a_thread_that_fails(self) -> None:
        spawner = self.spawner({})
        live_exit: Deferred[tuple[Any, Any]] = Deferred()
        pgid = await spawner.start("h13", [SH, "-c", "sleep 30"], lambda *how, d=live_exit: d.callback(how))
        self.addCleanup(signal_group, pgid, signal.SIGKILL)
        failed = spawner.start("h14", ["/nonexistent/prog"], lambda *how: None)
        self.assertFalse(failed.called)
        with self.assertRaises(SpawnError) as caught:
            await failed
        self.assertEqual(str(caught.exception), "cannot run /nonexistent/prog: No such file or directory")
        signal_group(pgid, signal.SIGKILL)
        await live_exit


class ReactorSpawnerTests(SpawnerTests, TestCase):
    provider = "reactor"

    def test_spawns_in_the_reactors_thread(self) -> None:
        self.assertEqual(self.spawner({}).threads, 0)


class SpawnerEnvironTests(TestCase):
    def test_handler_environ(self) -> None:
        calls = []
        base = {
            "PATH": "/usr/bin:/bin",
            "HOME": "/home/op",
            "KAPOW_DATA_URL": "http://stale",
            "KAPOW_CONTROL_SERVER_CERT": "server cert",
            "KAPOW_CONTROL_CLIENT_CERT": "client cert",
            "KAPOW_CONTROL_CLIENT_KEY": "client key",
        }

        def environ() -> dict[str, str]:
            calls.append(1)
            return base

        urls = iter([(DATA_URL, CONTROL_URL), ("http://127.0.0.1:9", "https://[::1]:9")])
        # both are read once: the listeners are up by the first spawn and stay
        spawner = Spawner(reactor, environ, lambda: next(urls), processes=ReactorProcesses(reactor))
        expected = {
            "PATH": "/usr/bin:/bin",
            "HOME": "/home/op",
            "KAPOW_HANDLER_ID": "abc",
            "KAPOW_DATA_URL": DATA_URL,
            "KAPOW_CONTROL_URL": CONTROL_URL,
        }
        first = spawner.handler_environ("abc")
        self.assertEqual(first, expected)
        self.assertEqual(sorted(first.entries), sorted(f"{k}={v}".encode() for k, v in expected.items()))
        second = spawner.handler_environ("def")
        self.assertEqual(
            (second["KAPOW_HANDLER_ID"], second["KAPOW_DATA_URL"], second["KAPOW_CONTROL_URL"]),
            ("def", DATA_URL, CONTROL_URL),
        )
        self.assertEqual(first["KAPOW_HANDLER_ID"], "abc")
        self.assertEqual(len(calls), 1)
        self.assertEqual(base["KAPOW_CONTROL_CLIENT_KEY"], "client key")


class LimitedSpawnTests(TestCase):
    """Handlers with resource limits, through each way there is to set them, and each provider."""

    timeout = 20

    def setUp(self) -> Deferred[None]:
        return reactor_running()

    def ways(self) -> list[tuple[str, LimitedCommand]]:
        found = []
        if native_client() is not None:
            found.append(("native", LimitedCommand(native_client(), None)))
        if shutil.which("prlimit") is not None:
            found.append(("prlimit", LimitedCommand(None, shutil.which("prlimit"))))
        if not found:
            raise SkipTest("neither the native client nor prlimit is here")
        return found

    def spawner(
        self, provider: str, limited: LimitedCommand | None, debug: bool = False, **kw: Any
    ) -> Spawner:
        spawner = Spawner(
            reactor, lambda: {"PATH": os.environ["PATH"]}, lambda: (DATA_URL, CONTROL_URL),
            processes=PROVIDERS[provider](), debug=debug, limited=limited, **kw,
        )  # fmt: skip
        self.addCleanup(spawner.close)
        return spawner

    async def limits_seen(
        self, limited: LimitedCommand, provider: str, debug: bool, limits: dict[str, int]
    ) -> dict[str, str]:
        """The limits of a handler's child, read by a process the handler forks first."""
        spawner = self.spawner(provider, limited, debug, default_limits={"open_files": 50, "cpu": 30})
        out = self.mktemp()
        exited: Deferred[tuple[Any, Any]] = Deferred()
        spawner.start(
            "h1",
            ["sh", "-c", f"cat /proc/self/limits > {out}"],
            lambda *how: exited.callback(how),
            limits=limits,
        )
        self.assertEqual(await exited, (0, None))
        with open(out) as f:
            rows = [line.rsplit(None, 3) for line in f.read().splitlines()[1:]]
        return {row[0]: f"{row[1]}:{row[2]}" for row in rows if len(row) == 4}

    async def test_limits_hold_in_the_handlers_children(self) -> None:
        limits = {"memory": 1 << 30, "cpu": 7, "file_size": 4096, "processes": 999}
        for name, limited in self.ways():
            for provider in PROVIDERS:
                for debug in (False, True):
                    seen = await self.limits_seen(limited, provider, debug, limits)
                    self.assertEqual(
                        (
                            seen["Max address space"], seen["Max cpu time"], seen["Max file size"],
                            seen["Max processes"], seen["Max open files"],
                        ),
                        (f"{1 << 30}:{1 << 30}", "7:8", "4096:4096", "999:999", "50:50"),
                        f"{name}, {provider}, debug={debug}",
                    )  # fmt: skip

    async def test_without_limits_the_program_runs_as_it_is(self) -> None:
        for provider in PROVIDERS:
            spawner = self.spawner(provider, LimitedCommand("/nonexistent/limits", None))
            exited: Deferred[tuple[Any, Any]] = Deferred()
            pid = await spawner.start(
                "h2", [SH, "-c", "sleep 5; true"], lambda *how, d=exited: d.callback(how)
            )
            self.addCleanup(signal_group, pid, signal.SIGKILL)

            def cmdline(pid: int = pid) -> bytes:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    return f.read()

            deadline = time.monotonic() + 5
            while not cmdline() and time.monotonic() < deadline:  # empty until its exec is done
                await deferLater(reactor, 0.01, lambda: None)
            self.assertEqual(
                cmdline(), b"/bin/sh\0-c\0sleep 5; true\0", provider
            )  # no program in front, ever
            signal_group(pid, signal.SIGKILL)
            await exited

    def test_a_program_that_cannot_run_is_refused_at_once(self) -> None:
        for _, limited in self.ways():
            spawner = self.spawner("reactor", limited)
            for argv in (["/nonexistent/prog"], ["no-such-program-anywhere"], [""], []):
                self.failureResultOf(
                    spawner.start("h3", argv, lambda *how: None, limits={"cpu": 1}), SpawnError
                )

    def test_limits_without_a_way_to_set_them(self) -> None:
        spawner = self.spawner("reactor", None)
        failed = self.failureResultOf(
            spawner.start("h4", [SH, "-c", "true"], lambda *how: None, limits={"cpu": 1}), SpawnError
        )
        self.assertIn("native kapow client or prlimit", failed.getErrorMessage())
