"""
The providers of handlers' processes, with real processes on the real
reactor: the same protocol test cases run against
:class:`~kapow.handlers.processes.ReactorProcesses` (Twisted's own processes),
:class:`~kapow.handlers.fast_processes.FastProcesses` spawning at once, and
``FastProcesses`` spawning in its threads (beside a live child). Then a real
server started with each ``--spawn``.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import process as _process
from twisted.internet import reactor
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.trial.unittest import SkipTest, TestCase

from kapow.handlers.fast_processes import FastProcesses, SpawnedProcess
from kapow.handlers.processes import GroupProcess, ReactorProcesses
from kapow.handlers.spawn import signal_group
from tests.support.kapowserver import KapowServer, curl, wait_for
from tests.support.processes import Collector, alive, open_fds, reactor_running, until

SH = "/bin/sh"
PYTHON = sys.executable


class ProcessesTests:
    """
    The test cases every provider passes; a subclass says which provider
    (:meth:`make`) and whether a child of it lives beside every spawn.
    """

    timeout = 20
    #: a child of the provider lives through each test, before its first spawn
    beside = False

    def make(self) -> IReactorProcess:
        raise NotImplementedError

    def setUp(self) -> Any:
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.addCleanup(os.close, self.devnull)
        return reactor_running()

    async def provider(self) -> IReactorProcess:
        """A new provider (with a child living beside, if the class says so)."""
        processes = self.make()
        if self.beside:
            live = Collector()
            processes.spawnProcess(
                live,
                SH,
                [SH, "-c", "sleep 30"],
                {},
                childFDs={0: self.devnull, 1: self.devnull, 2: self.devnull},
            )
            pid = await live.started

            async def end() -> None:
                signal_group(pid, signal.SIGKILL)
                await live.ended

            self.addCleanup(end)
        return processes

    async def start(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        child_fds: dict[int, int | str] | None = None,
        processes: IReactorProcess | None = None,
    ) -> tuple[int, Collector, IProcessTransport]:
        """
        Start ``argv`` (with pipes on stdout and stderr by default): its pid,
        its protocol and its transport, once it runs. Its group is killed
        after the test.
        """
        protocol = Collector()
        transport = (processes or await self.provider()).spawnProcess(
            protocol, argv[0], argv, env or {}, childFDs=child_fds or {0: self.devnull, 1: "r", 2: "r"}
        )
        if self.beside:  # the spawn waits in a thread: not connected, no pid yet
            self.assertEqual((transport.pid, protocol.connections), (None, 0))
        pid = await protocol.started
        self.assertEqual(protocol.connections, 1)

        async def reap() -> None:
            signal_group(pid, signal.SIGKILL)
            await protocol.ended

        self.addCleanup(reap)
        return pid, protocol, transport

    async def test_program_leads_a_new_group_in_this_session(self) -> None:
        """
        A group of its own, which ending it signals; this process's session,
        so that the scheduler's autogroup counts it with the server.
        """
        pid, protocol, _ = await self.start(
            [PYTHON, "-c", "import os; print(os.getpid(), os.getsid(0), os.getpgid(0))"]
        )
        await protocol.ended
        reported = tuple(map(int, protocol.output[1].split()))
        self.assertEqual(reported, (pid, os.getsid(0), pid))
        self.assertNotEqual(reported[2], os.getpgid(0))

    async def test_shell_and_its_children_share_the_group(self) -> None:
        pid, protocol, _ = await self.start(
            [SH, "-c", f'echo $$; "{PYTHON}" -c "import os; print(os.getsid(0), os.getpgid(0))"; true']
        )
        reason = await protocol.ended
        self.assertIsInstance(reason, ProcessDone, protocol.output[2])
        self.assertEqual(tuple(map(int, protocol.output[1].split())), (pid, os.getsid(0), pid))

    async def test_exit_status_reported_at_exit_then_the_end(self) -> None:
        pid, protocol, transport = await self.start([SH, "-c", "echo out; echo err >&2; exit 7"])
        self.assertIn(transport.pid, (pid, None))  # None once reaped, which may be at once
        reason = await protocol.exited
        self.assertIsInstance(reason, ProcessTerminated)
        self.assertEqual((reason.exitCode, reason.signal), (7, None))
        self.assertIsNone(transport.pid, "reaped")
        ended = await protocol.ended
        self.assertEqual((ended.exitCode, ended.signal), (7, None))
        self.assertEqual((protocol.output[1], protocol.output[2]), (b"out\n", b"err\n"))
        self.assertEqual(sorted(protocol.lost), [1, 2])
        self.assertEqual(getattr(transport, "pgid", None), pid, "its group is kept once it is reaped")
        with self.assertRaises(ProcessExitedAlready):
            transport.signalProcess("TERM")

    async def test_a_signal_is_reported(self) -> None:
        _, protocol, transport = await self.start([SH, "-c", "echo ready; exec sleep 30"])
        await until(lambda: protocol.output[1] == b"ready\n", what="ready")
        transport.signalProcess("TERM")
        reason = await protocol.exited
        self.assertEqual((reason.exitCode, reason.signal), (None, signal.SIGTERM))
        await protocol.ended

    async def test_exit_reported_while_a_background_child_holds_stdout(self) -> None:
        started = time.monotonic()
        _, protocol, _ = await self.start([SH, "-c", "sleep 5 & echo $$"])
        reason = await protocol.exited
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertIsInstance(reason, ProcessDone)
        await until(lambda: protocol.output[1].endswith(b"\n"), what="output")
        self.assertFalse(protocol.ended.called, "the background sleep still holds stdout")
        self.assertTrue(signal_group(int(protocol.output[1]), signal.SIGTERM))
        await protocol.ended
        self.assertLess(time.monotonic() - started, 4, "the group signal ended the background child")

    async def test_signal_group_ends_process_and_grandchildren(self) -> None:
        pid, protocol, _ = await self.start([SH, "-c", "sleep 30 & echo $!; sleep 30 & echo $!; wait"])
        await until(lambda: protocol.output[1].count(b"\n") == 2, what="grandchild pids")
        pids = [pid, *map(int, protocol.output[1].split())]
        self.assertTrue(all(alive(p) for p in pids))
        self.assertTrue(signal_group(pid, signal.SIGTERM))
        await until(lambda: not any(alive(p) for p in pids), what="the group to end")
        reason = await protocol.ended
        self.assertEqual(reason.signal, signal.SIGTERM)

    async def test_ignored_signals_are_reset_in_the_child(self) -> None:
        self.assertEqual(signal.getsignal(signal.SIGPIPE), signal.SIG_IGN)  # as Python sets it
        _, protocol, _ = await self.start(
            ["/usr/bin/env", "grep", "SigIgn", "/proc/self/status"], {"PATH": os.environ["PATH"]}
        )
        await protocol.ended
        ignored = int(protocol.output[1].split()[1], 16)
        self.assertEqual(ignored & (1 << (signal.SIGPIPE - 1)), 0, protocol.output[1])

    async def test_the_child_gets_its_descriptors_and_no_other(self) -> None:
        # inherited without close-on-exec (as systemd's sockets are) before the first spawn
        inherited = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, inherited)
        os.set_inheritable(inherited, True)
        processes = await self.provider()
        for child_fds in ({0: self.devnull, 1: "r", 2: "r"}, {1: "r", 5: self.devnull}):
            _, protocol, _ = await self.start(
                [SH, "-c", "ls /proc/$$/fd"], child_fds=child_fds, processes=processes
            )
            await protocol.ended
            self.assertEqual(sorted(map(int, protocol.output[1].split())), sorted(child_fds))
        self.assertFalse(os.get_inheritable(inherited), "made close-on-exec at the first spawn")

    async def test_stdin_from_a_descriptor(self) -> None:
        with tempfile.TemporaryFile() as body:
            body.write(b"the body\n")
            body.seek(0)
            script = '[ "$(cat)" = "the body" ] && exit 3; exit 4'
            _, protocol, _ = await self.start(
                [SH, "-c", script], child_fds={0: body.fileno(), 1: "r", 2: "r"}
            )
            self.assertEqual((await protocol.exited).exitCode, 3)

    async def test_stdin_through_a_pipe(self) -> None:
        protocol = Collector()
        transport = (await self.provider()).spawnProcess(
            protocol, "cat", ["cat"], {"PATH": os.environ["PATH"]}, childFDs={0: "w", 1: "r", 2: self.devnull}
        )
        transport.write(b"written ")  # before it runs, when it waits in a thread
        transport.writeToChild(0, b"to its stdin\n")
        transport.closeStdin()
        pid = await protocol.started
        self.addCleanup(signal_group, pid, signal.SIGKILL)
        self.assertIsInstance(await protocol.ended, ProcessDone)
        self.assertEqual(protocol.output[1], b"written to its stdin\n")

    async def test_cannot_start(self) -> None:
        script = self.mktemp()
        with open(script, "w") as f:
            f.write("#!/bin/sh\necho hi\n")
        os.chmod(script, stat.S_IRUSR | stat.S_IWUSR)
        processes = await self.provider()
        before = open_fds()
        for argv, code in (
            (["/nonexistent/prog"], errno.ENOENT),
            (["/nonexistent/prog", "-c", "x"], errno.ENOENT),
            (["no-such-program-anywhere"], errno.ENOENT),
            ([script], errno.EACCES),
            (["/"], errno.EACCES),
        ):
            protocol = Collector()
            try:
                processes.spawnProcess(
                    protocol, argv[0], argv, {"PATH": "/usr/bin:/bin"}, childFDs={0: "w", 1: "r", 2: "r"}
                )
            except OSError as e:  # at once: raised, the protocol never called
                self.assertFalse(self.beside, "a spawn beside a live child waits in a thread")
                error: Any = e
                self.assertFalse(protocol.ended.called)
            else:  # in a thread: the protocol ends, never connected
                self.assertTrue(self.beside)
                error = await protocol.ended
                self.assertFalse(protocol.exited.called)
            self.assertIsInstance(error, OSError)
            self.assertEqual((error.errno, protocol.connections), (code, 0), argv)
        # only new ones count: an earlier test's sockets may be collected meanwhile
        self.assertEqual(open_fds() - before, set(), "pipes of failed starts are closed")


class ReactorProcessesTests(ProcessesTests, TestCase):
    def make(self) -> IReactorProcess:
        return ReactorProcesses(reactor)

    async def test_its_children_are_twisted_processes(self) -> None:
        pid, _, transport = await self.start([SH, "-c", "sleep 30"])
        self.assertIsInstance(transport, GroupProcess)
        self.assertIn(pid, _process.reapProcessHandlers)  # reaped at SIGCHLD


class FastProcessesTests(ProcessesTests, TestCase):
    def make(self) -> IReactorProcess:
        why = FastProcesses.unavailable()
        if why is not None:
            raise SkipTest(why)
        processes = FastProcesses(reactor)
        self.addCleanup(processes.close)
        return processes

    async def test_its_children_are_watched_through_pidfds(self) -> None:
        pid, _, transport = await self.start([SH, "-c", "sleep 30"])
        self.assertIsInstance(transport, SpawnedProcess)
        self.assertNotIn(pid, _process.reapProcessHandlers)  # no Process object, no SIGCHLD scan
        self.assertEqual(os.readlink(f"/proc/self/fd/{transport.fileno()}"), "anon_inode:[pidfd]")


class FastProcessesInThreadsTests(FastProcessesTests):
    beside = True

    async def test_a_signal_before_it_runs_is_sent_once_it_does(self) -> None:
        protocol = Collector()
        transport = (await self.provider()).spawnProcess(
            protocol,
            SH,
            [SH, "-c", "sleep 30"],
            {},
            childFDs={0: self.devnull, 1: self.devnull, 2: self.devnull},
        )
        transport.signalProcess("KILL")
        self.assertIsNone(transport.pid)
        reason = await protocol.exited
        self.assertEqual(reason.signal, signal.SIGKILL)
        self.assertEqual(protocol.connections, 1)


# -- a real server with each provider --------------------------------------------


@pytest.mark.parametrize("spawn", ["fast", "reactor"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_server_with_either_provider(start_server: Any, tmp_path: Path, spawn: str, workers: str) -> None:
    server: KapowServer = start_server(extra=("--spawn", spawn, "--debug", "--workers", workers))
    pidfile = tmp_path / "bg"
    server.add_route(
        "/bg",
        f"sleep 60 & echo $! > {pidfile}; echo to stdout; echo to stderr >&2;"
        " echo done | kapow set /response/body; exit 3",
    )
    server.add_route("/missing", "", "-e", "/nonexistent/prog")
    try:
        started = time.monotonic()
        result = curl("-sS", "--max-time", "10", "-w", "%{http_code}", server.user + "/bg")
        assert result.stdout == "done\n200"
        assert time.monotonic() - started < 5, "complete at exit, not when the background child ends"
        handler = server.wait_log(r"([0-9a-f]{32}): to stdout").group(1)
        server.wait_log(rf"{handler} \(stderr\): to stderr")
        server.wait_log(rf"handler {handler} exited with status 3")
        result = curl("-sS", "-o", "/dev/null", "-w", "%{http_code}", server.user + "/missing")
        assert result.stdout == "500"
        server.wait_log(r"cannot start: cannot run /nonexistent/prog: No such file or directory")
    finally:
        pid = int(str(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pid")))
        os.kill(pid, signal.SIGKILL)


def test_an_unknown_provider_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="--spawn must be fast or reactor, not 'forked'"):
        KapowServer(tmp_path / "s", extra=("--spawn", "forked"))
