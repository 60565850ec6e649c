"""
Tests for kapow.handlers.spawn with real processes and the real reactor: sessions,
exit versus end of output, process-group signals, start failures and the
handler environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import process as _process
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from kapow.commands.launcher import native_client
from kapow.core.resource_limits import LimitedCommand
from kapow.handlers.spawn import (
    SessionProcess,
    Spawner,
    SpawnError,
    ignored_signals,
    pidfds_work,
    quiet_sigchld,
    signal_group,
    spawn_in_session,
)

SH = "/bin/sh"
PYTHON = sys.executable
DATA_URL = "http://localhost:8082"
CONTROL_URL = "https://localhost:8081"


class Collector(ProcessProtocol):
    """Keeps a child's output and reports its exit and its end separately."""

    def __init__(self) -> None:
        self.output: dict[int, bytes] = {1: b"", 2: b""}
        self.exited: Deferred[Any] = Deferred()
        self.ended: Deferred[Any] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output[childFD] += data

    def processExited(self, reason: Failure) -> None:
        self.exited.callback(reason.value)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value)


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie nobody reaps does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def reactor_running() -> Deferred[None]:
    """
    Fires once the reactor runs its main loop, with its SIGCHLD handler.
    Tests spawn from there: a test that ends while the reactor is still
    starting (a child reaped by the start-up reap) leaves trial's next
    reactor run without that handler, and children are never reaped.
    """

    def check(_: object) -> None:
        if signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL:
            raise AssertionError("the reactor runs without its SIGCHLD handler")

    return deferLater(reactor, 0, lambda: None).addCallback(check)


class SpawnTests(TestCase):
    timeout = 20

    def setUp(self) -> Deferred[None]:
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.addCleanup(os.close, self.devnull)
        return reactor_running()

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[int | None, Collector]:
        """
        Start ``argv`` with pipes on stdout and stderr: (its pid, its
        protocol). Its group is killed after the test. The pid is ``None``
        if the child was gone before twisted registered it.
        """
        protocol = Collector()
        process = spawn_in_session(
            reactor, protocol, argv, env or {}, {0: self.devnull, 1: "r", 2: "r"}, ignored_signals()
        )
        self.assertIsInstance(process, SessionProcess)
        pid = process.pid

        async def reap() -> None:
            if pid is not None:
                signal_group(pid, signal.SIGKILL)
            await protocol.ended

        self.addCleanup(reap)
        return pid, protocol

    async def until(self, condition: Callable[[], Any], seconds: float = 5, what: str = "condition") -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            self.assertLess(time.monotonic(), deadline, f"timed out waiting for {what}")
            await deferLater(reactor, 0.01, lambda: None)

    async def test_program_leads_a_new_session(self) -> None:
        pid, protocol = self.start(
            [PYTHON, "-c", "import os; print(os.getpid(), os.getsid(0), os.getpgid(0))"]
        )
        await protocol.ended
        reported = tuple(map(int, protocol.output[1].split()))
        self.assertEqual(reported, (pid, pid, pid))
        self.assertNotEqual(reported[1], os.getsid(0))

    async def test_shell_and_its_children_share_the_session(self) -> None:
        pid, protocol = self.start(
            [
                SH,
                "-c",
                f'echo $$; "{PYTHON}" -c "import os; print(os.getsid(0), os.getpgid(0))"; true',
            ]
        )
        reason = await protocol.ended
        self.assertEqual(reason.exitCode, 0, protocol.output[2])
        shell, sid, pgid = map(int, protocol.output[1].split())
        self.assertEqual((shell, sid, pgid), (pid, pid, pid))

    async def test_exit_status_reported(self) -> None:
        _, protocol = self.start([SH, "-c", "echo out; echo err >&2; exit 7"])
        reason = await protocol.exited
        self.assertEqual((reason.exitCode, reason.signal), (7, None))
        await protocol.ended
        self.assertEqual((protocol.output[1], protocol.output[2]), (b"out\n", b"err\n"))

    async def test_exit_reported_while_a_background_child_holds_stdout(self) -> None:
        started = time.monotonic()
        _, protocol = self.start([SH, "-c", "sleep 5 & echo $$"])
        reason = await protocol.exited
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertEqual(reason.exitCode, 0)
        await self.until(lambda: protocol.output[1].endswith(b"\n"), what="output")
        self.assertFalse(protocol.ended.called, "the background sleep still holds stdout")
        self.assertTrue(signal_group(int(protocol.output[1]), signal.SIGTERM))
        await protocol.ended
        self.assertLess(time.monotonic() - started, 4, "the group signal ended the background child")

    async def test_signal_group_ends_process_and_grandchildren(self) -> None:
        pid, protocol = self.start([SH, "-c", "sleep 30 & echo $!; sleep 30 & echo $!; wait"])
        await self.until(lambda: protocol.output[1].count(b"\n") == 2, what="grandchild pids")
        pids = [pid, *map(int, protocol.output[1].split())]
        self.assertTrue(all(alive(p) for p in pids))
        self.assertTrue(signal_group(pid, signal.SIGTERM))
        await self.until(lambda: not any(alive(p) for p in pids), what="the group to end")
        reason = await protocol.ended
        self.assertEqual(reason.signal, signal.SIGTERM)

    async def test_signal_group_after_the_group_is_gone(self) -> None:
        _, protocol = self.start([SH, "-c", "echo $$"])
        await protocol.ended
        pid = int(protocol.output[1])
        self.assertFalse(signal_group(pid, signal.SIGTERM))
        self.assertFalse(signal_group(pid, 0))

    async def test_ignored_signals_are_reset_in_the_child(self) -> None:
        previous = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.addCleanup(signal.signal, signal.SIGPIPE, previous)
        _, protocol = self.start(
            ["/usr/bin/env", "grep", "SigIgn", "/proc/self/status"],
            {"PATH": os.environ["PATH"]},
        )
        await protocol.ended
        ignored = int(protocol.output[1].split()[1], 16)
        self.assertEqual(ignored & (1 << (signal.SIGPIPE - 1)), 0, protocol.output[1])

    def test_cannot_start(self) -> None:
        script = self.mktemp()
        with open(script, "w") as f:
            f.write("#!/bin/sh\necho hi\n")
        os.chmod(script, stat.S_IRUSR | stat.S_IWUSR)
        before = open_fds()
        for argv in (
            [],
            [""],
            ["/nonexistent/prog"],
            ["/nonexistent/prog", "-c", "x"],
            [script],
            ["/"],
        ):
            error = self.assertRaises(
                SpawnError,
                spawn_in_session,
                reactor,
                Collector(),
                argv,
                {},
                {0: self.devnull, 1: "r", 2: "r"},
            )
            self.assertNotIn("\n", str(error))
            if argv and argv[0]:
                self.assertIn(argv[0], str(error))
        # only new ones count: an earlier test's sockets may be collected meanwhile
        self.assertEqual(open_fds() - before, set(), "pipes of failed starts are closed")


class SpawnerTests(TestCase):
    timeout = 20

    def setUp(self) -> Deferred[None]:
        return reactor_running()

    def spawner(self, base: dict[str, str], debug: bool = False, threads: int = 4) -> Spawner:
        spawner = Spawner(
            reactor, lambda: base, lambda: (DATA_URL, CONTROL_URL), debug=debug, threads=threads
        )
        self.addCleanup(spawner.close)
        return spawner

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
        spawner = Spawner(reactor, environ, lambda: next(urls))
        self.assertEqual(
            spawner.handler_environ("abc"),
            {
                "PATH": "/usr/bin:/bin",
                "HOME": "/home/op",
                "KAPOW_HANDLER_ID": "abc",
                "KAPOW_DATA_URL": DATA_URL,
                "KAPOW_CONTROL_URL": CONTROL_URL,
            },
        )
        second = spawner.handler_environ("def")
        self.assertEqual(
            (
                second["KAPOW_HANDLER_ID"],
                second["KAPOW_DATA_URL"],
                second["KAPOW_CONTROL_URL"],
            ),
            ("def", DATA_URL, CONTROL_URL),
        )
        self.assertEqual(len(calls), 1)
        self.assertEqual(base["KAPOW_CONTROL_CLIENT_KEY"], "client key")

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
            self.assertLess(time.monotonic(), deadline, lines())
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
        self.assertEqual(how, (3, None))
        self.assertEqual(
            sorted(lines),
            sorted(
                [
                    f"h1: id=h1 data={DATA_URL} control={CONTROL_URL}",
                    "h1: key=unset cert=unset",
                    "h1 (stderr): oops",
                    "h1: no newline",
                    "h1 (stderr): the end",
                ]
            ),
        )
        self.assertLess(lines.index("h1 (stderr): oops"), lines.index("h1 (stderr): the end"))

    async def test_output_discarded_without_debug(self) -> None:
        spawner = self.spawner({"PATH": os.environ["PATH"]})
        how, lines = await self.run_handler(spawner, "h2", "echo out; echo err >&2; echo the end")
        self.assertEqual(how, (0, None))
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(lines, [])

    async def test_handlers_get_no_descriptor_but_0_1_2(self) -> None:
        # inherited without close-on-exec (as systemd's sockets are) before the first spawn
        inherited = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, inherited)
        os.set_inheritable(inherited, True)
        spawner = self.spawner({"PATH": os.environ["PATH"]}, debug=True)
        for handler_id in ("h5", "h6"):
            how, lines = await self.run_handler(spawner, handler_id, "ls /proc/$$/fd", lines_expected=3)
            self.assertEqual(how, (0, None))
            self.assertEqual(sorted(lines), [f"{handler_id}: {fd}" for fd in (0, 1, 2)])
        self.assertFalse(os.get_inheritable(inherited))

    async def test_stdin_is_the_given_descriptor_else_empty(self) -> None:
        for debug, beside in ((False, False), (False, True), (True, False)):
            spawner = self.spawner({"PATH": os.environ["PATH"]}, debug=debug)
            if beside:  # a live handler: the spawns go through a thread
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
            self.assertEqual(results, [(3, None), (4, None)], f"debug={debug} beside={beside}")
            if beside:
                signal_group(live, signal.SIGKILL)
                await live_exit

    async def test_killed_handler_reports_the_signal(self) -> None:
        spawner = self.spawner({"PATH": os.environ["PATH"]})
        exited: Deferred[tuple[Any, Any]] = Deferred()
        pgid = await spawner.start("h3", [SH, "-c", "sleep 30"], lambda *how: exited.callback(how))
        self.addCleanup(signal_group, pgid, signal.SIGKILL)
        self.assertTrue(signal_group(pgid, signal.SIGTERM))
        self.assertEqual(await exited, (None, signal.SIGTERM))

    async def test_start_returns_the_group_of_a_child_that_exits_at_once(self) -> None:
        register = _process.registerReapProcessHandler

        def register_after_exit(pid: int, process: Any) -> None:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            register(pid, process)

        self.patch(_process, "registerReapProcessHandler", register_after_exit)
        spawner = self.spawner({}, debug=True)  # the way through Twisted's Process
        exits: list[Any] = []
        started = spawner.start("h5", [SH, "-c", "exit 0"], lambda *how: exits.append(how))
        self.assertIsInstance(self.successResultOf(started), int)
        self.assertEqual(exits, [])
        await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(exits, [(0, None)])

    async def test_an_exit_at_once_is_reported_after_start_returns(self) -> None:
        for debug in (False, True):
            spawner = self.spawner({}, debug=debug)
            exited: Deferred[tuple[Any, Any]] = Deferred()
            started = spawner.start("h7", [SH, "-c", "exit 7"], lambda *how, d=exited: d.callback(how))

            def gone(pgid: int, exited: Deferred[Any] = exited) -> int:
                time.sleep(0.05)  # gone before the reactor turns again
                self.assertFalse(exited.called)
                return pgid

            pgid = await started.addCallback(gone)
            self.assertFalse(exited.called)
            self.assertEqual(await exited, (7, None))
            self.assertFalse(os.path.exists(f"/proc/{pgid}"), "reaped, no zombie left")

    async def test_handlers_without_output_are_watched_through_a_pidfd(self) -> None:
        if not pidfds_work():
            raise SkipTest("no pidfds here")
        spawner = self.spawner({})
        exited: Deferred[tuple[Any, Any]] = Deferred()
        pgid = await spawner.start("h8", [SH, "-c", "sleep 5"], lambda *how: exited.callback(how))
        self.assertNotIn(pgid, _process.reapProcessHandlers)  # no Process object, no SIGCHLD scan
        signal_group(pgid, signal.SIGKILL)
        self.assertEqual(await exited, (None, signal.SIGKILL))

    async def test_handlers_watched_with_sigchld_at_its_default(self) -> None:
        """A worker's SIGCHLD at its default: no wake-up, handlers still reaped with their status."""
        if not pidfds_work():
            raise SkipTest("no pidfds here")
        before = signal.getsignal(signal.SIGCHLD)

        def restore() -> None:  # the reactor's, as it set it
            signal.signal(signal.SIGCHLD, before)
            signal.siginterrupt(signal.SIGCHLD, False)

        self.addCleanup(restore)
        quiet_sigchld()
        self.assertEqual(signal.getsignal(signal.SIGCHLD), signal.SIG_DFL)
        spawner = self.spawner({})
        exited: Deferred[tuple[Any, Any]] = Deferred()
        pgid = await spawner.start("h9", [SH, "-c", "exit 3"], lambda *how: exited.callback(how))
        self.assertEqual(await exited, (3, None))
        self.assertFalse(os.path.exists(f"/proc/{pgid}"), "reaped, no zombie left")

    async def test_start_failure(self) -> None:
        for debug in (False, True):
            spawner = self.spawner({}, debug=debug)
            with self.assertRaises(SpawnError) as caught:
                await spawner.start("h4", ["/nonexistent/prog"], lambda *how: None)
            self.assertIn("cannot run /nonexistent/prog", str(caught.exception))
            with self.assertRaises(SpawnError):
                await spawner.start("h4", [], lambda *how: None)

    async def test_a_spawn_beside_live_handlers_leaves_the_reactor_free(self) -> None:
        """Alone, a handler is spawned at once; beside a live one, the spawn
        waits in a spawning thread, not in the reactor."""
        if not pidfds_work():
            raise SkipTest("no pidfds here")
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
        if not pidfds_work():
            raise SkipTest("no pidfds here")
        spawner = self.spawner({}, threads=0)
        exits: list[Deferred[tuple[Any, Any]]] = [Deferred(), Deferred()]
        pgids = []
        for handler_id, script, done in (("h15", "sleep 30", exits[0]), ("h16", "exit 5", exits[1])):
            started = spawner.start(handler_id, [SH, "-c", script], lambda *how, d=done: d.callback(how))
            pgids.append(self.successResultOf(started))
            self.addCleanup(signal_group, pgids[-1], signal.SIGKILL)
        self.assertEqual(await exits[1], (5, None))
        signal_group(pgids[0], signal.SIGKILL)
        self.assertEqual(await exits[0], (None, signal.SIGKILL))
        self.assertIsNone(spawner._spawn_threads)

    async def test_a_spawn_in_a_thread_that_fails(self) -> None:
        if not pidfds_work():
            raise SkipTest("no pidfds here")
        spawner = self.spawner({})
        live_exit: Deferred[tuple[Any, Any]] = Deferred()
        pgid = await spawner.start("h13", [SH, "-c", "sleep 30"], lambda *how, d=live_exit: d.callback(how))
        self.addCleanup(signal_group, pgid, signal.SIGKILL)
        failed = spawner.start("h14", ["/nonexistent/prog"], lambda *how: None)
        self.assertFalse(failed.called)
        with self.assertRaises(SpawnError) as caught:
            await failed
        self.assertIn("cannot run /nonexistent/prog", str(caught.exception))
        signal_group(pgid, signal.SIGKILL)
        await live_exit


class LimitedSpawnTests(TestCase):
    """Handlers with resource limits, through each way there is to set them, and both spawn paths."""

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

    async def limits_seen(
        self, limited: LimitedCommand, debug: bool, limits: dict[str, int]
    ) -> dict[str, str]:
        """The limits of a handler's child, read by a process the handler forks first."""
        spawner = Spawner(
            reactor, lambda: {"PATH": os.environ["PATH"]}, lambda: (DATA_URL, CONTROL_URL), debug=debug,
            limited=limited, default_limits={"open_files": 50, "cpu": 30},
        )  # fmt: skip
        self.addCleanup(spawner.close)
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
            for debug in (False, True):
                seen = await self.limits_seen(limited, debug, limits)
                self.assertEqual(
                    (
                        seen["Max address space"], seen["Max cpu time"], seen["Max file size"],
                        seen["Max processes"], seen["Max open files"],
                    ),
                    (f"{1 << 30}:{1 << 30}", "7:8", "4096:4096", "999:999", "50:50"),
                    f"{name}, debug={debug}",
                )  # fmt: skip

    async def test_without_limits_the_program_runs_as_it_is(self) -> None:
        spawner = Spawner(
            reactor, lambda: {"PATH": os.environ["PATH"]}, lambda: (DATA_URL, CONTROL_URL),
            limited=LimitedCommand("/nonexistent/limits", None),
        )  # fmt: skip
        self.addCleanup(spawner.close)
        exited: Deferred[tuple[Any, Any]] = Deferred()
        pid = await spawner.start("h2", [SH, "-c", "sleep 5; true"], lambda *how: exited.callback(how))
        self.addCleanup(signal_group, pid, signal.SIGKILL)

        def cmdline() -> bytes:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read()

        deadline = time.monotonic() + 5
        while not cmdline() and time.monotonic() < deadline:  # empty until its exec is done
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(cmdline(), b"/bin/sh\0-c\0sleep 5; true\0")  # no program in front, ever
        signal_group(pid, signal.SIGKILL)
        await exited

    def test_a_program_that_cannot_run_is_refused_at_once(self) -> None:
        for _, limited in self.ways():
            spawner = Spawner(reactor, lambda: {}, lambda: (DATA_URL, CONTROL_URL), limited=limited)
            self.addCleanup(spawner.close)
            for argv in (["/nonexistent/prog"], ["no-such-program-anywhere"], [""], []):
                self.failureResultOf(
                    spawner.start("h3", argv, lambda *how: None, limits={"cpu": 1}), SpawnError
                )

    def test_limits_without_a_way_to_set_them(self) -> None:
        spawner = Spawner(reactor, lambda: {}, lambda: (DATA_URL, CONTROL_URL), limited=None)
        self.addCleanup(spawner.close)
        failed = self.failureResultOf(
            spawner.start("h4", [SH, "-c", "true"], lambda *how: None, limits={"cpu": 1}), SpawnError
        )
        self.assertIn("native kapow client or prlimit", failed.getErrorMessage())
