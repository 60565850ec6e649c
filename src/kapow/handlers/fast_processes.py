# -*- test-case-name: tests.e2e.test_processes -*-
"""
The faster provider of handlers' processes, beneath the same
:class:`~twisted.internet.interfaces.IReactorProcess` as
:class:`kapow.handlers.processes.ReactorProcesses` and driving the same
protocol callbacks: every child leads a process group of its own, with the
ignored signals back to their default and the descriptors of ``childFDs``
and no other (see :mod:`kapow.handlers.processes`).

:class:`FastProcesses` spawns through the C library
(:mod:`kapow.handlers.libc_spawn`), which waits for the child's ``exec``
without the interpreter lock: while other children of it live, in a thread
of its own (:class:`SpawnThreads`), so that the reactor serves their
requests meanwhile; alone, at once, which spares the two thread switches
when nothing else would run. It watches each exit through a pidfd (Linux
5.3+), which spares Twisted's scan of every child at each ``SIGCHLD``, and
never scans the open descriptors at a spawn. ``"r"`` and ``"w"`` of
``childFDs`` get pipes, read and written by Twisted's own readers and writers.

A spawn that waits in a thread answers ``spawnProcess`` at once with a
:class:`SpawnedProcess` whose ``pid`` is ``None``; its protocol is
connected (``makeConnection``) once the child runs, or, if it could not
start, ends (``processEnded`` with the :class:`OSError`) without ever being
connected. A spawn at once raises the :class:`OSError`, as the reactor does.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from queue import SimpleQueue
from typing import AnyStr

from twisted.internet import process as _process
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import (
    IAddress,
    IProcessProtocol,
    IProcessTransport,
    IProducer,
    IReactorFDSet,
    IReactorProcess,
    IReadDescriptor,
)
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kapow.handlers.libc_spawn import (
    CStrings,
    FileActions,
    FileSteps,
    SharedStrings,
    Spawn,
    c_program,
    c_strings,
    eventfd_signaller,
    unavailable,
)
from kapow.handlers.processes import (
    NO_ENVIRONMENT,
    STDIO_PIPES,
    Environ,
    encoded_environ,
    exit_reason,
    pidfds_work,
    prepare_children,
)

__all__ = [
    "SPAWN_THREADS",
    "FastProcesses",
    "SpawnThreads",
    "SpawnedProcess",
    "child_file_steps",
    "quiet_sigchld",
]

log = Logger()

#: Threads a server alone waits in for spawns while other handlers live.
SPAWN_THREADS = 4

#: Environments whose shared entries are kept converted for the C library.
KEPT_ENVIRONS = 8


def quiet_sigchld() -> None:
    """
    Set ``SIGCHLD`` back to its default, in a process whose only children
    are those of :class:`FastProcesses` (a worker of ``--workers``): the
    reactor's own handler would wake it at every handler's exit only to look
    for Twisted processes it has none of. The default neither interrupts nor
    reaps anything: each child is still reaped through its pidfd. Call it
    once the reactor runs (it sets its handler as it starts).
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


@functools.lru_cache(maxsize=64)
def child_file_steps(layout: tuple[tuple[int, int], ...]) -> FileSteps:
    """
    The file actions that give a child exactly the descriptors of ``layout``
    (pairs of its descriptor and the one of this process it gets), whatever
    their numbers, and of 0, 1 and 2 only those. Every other descriptor of
    this process from 3 up is close-on-exec, so the exec closes it: the
    sources of a handler's usual layout take a ``dup2`` each and nothing more.
    """
    dup, close = os.POSIX_SPAWN_DUP2, os.POSIX_SPAWN_CLOSE
    targets = {target for target, _ in layout}
    sources = {source for _, source in layout}
    closed = {0, 1, 2} - targets
    if sources.isdisjoint(targets):  # no source is overwritten before it is read
        steps = [(dup, source, target) for target, source in layout]
    else:  # every source first out of the way, above all of them
        top = max(targets | sources) + 1
        moved = {source: top + n for n, source in enumerate(sorted(sources))}
        steps = [(dup, source, place) for source, place in moved.items()]
        steps += [(dup, moved[source], target) for target, source in layout]
        closed |= set(moved.values())
    return (*steps, *((close, fd) for fd in sorted(closed)))


@implementer(IReadDescriptor)
class SpawnThreads:
    """
    Runs spawns in threads of its own, each answered in the reactor: a
    queue to the threads, and a queue of answers the reactor drains, lighter
    than a thread pool's dispatch. Each spawn waits until its child has
    executed its program, longer on a loaded machine, so a few threads share
    the queue.

    What a spawn in a thread costs beyond the spawn is the threads taking
    turns at the interpreter lock: a thread that takes it while the reactor
    waits in a system call keeps the reactor waiting when that call is
    done, and each turn is two context switches. So a thread takes it only
    twice per spawn (woken for the job, back from the C library), and
    answers without letting go of it: it queues the answer and wakes the
    reactor through an eventfd only if no wake-up is pending already (one
    read for all the answers of a turn of the reactor), by a write that holds
    the lock (:func:`~kapow.handlers.libc_spawn.eventfd_signaller`).

    :param reactor: where results are delivered, through the reader of an
        eventfd (opened now, read while the threads run).
    :param threads: how many threads (started at the first call).
    """

    def __init__(self, reactor: IReactorFDSet, threads: int) -> None:
        self.reactor = reactor
        self.size = threads
        #: (spawn, done, failed) of each spawn asked for; ``None`` ends a thread
        self._jobs: SimpleQueue[
            tuple[Callable[[], int], Callable[[int], None], Callable[[BaseException], None]] | None
        ] = SimpleQueue()
        #: the answers the reactor has yet to call
        self._answers: deque[Callable[[], None]] = deque()
        self._threads: list[threading.Thread] = []
        self._eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._wake = eventfd_signaller()
        #: a wake-up was written and the reactor has not read it yet
        self._woken = False

    def run(
        self, spawn: Callable[[], int], done: Callable[[int], None], failed: Callable[[BaseException], None]
    ) -> None:
        """Call ``spawn()`` in a thread; then ``done(pid)``, or ``failed(error)``, in the reactor."""
        if not self._threads:
            self.reactor.addReader(self)
            for n in range(self.size):
                thread = threading.Thread(target=self._run, name=f"kapow-spawn-{n}", daemon=True)
                thread.start()
                self._threads.append(thread)
        self._jobs.put((spawn, done, failed))

    def _run(self) -> None:
        # Signals are the reactor's: blocked here, the kernel delivers them to
        # the main thread. Otherwise each child's SIGCHLD would go to the
        # thread that spawned it (its parent), waking it from its wait for
        # work only to pass the signal on. Children start with an empty mask
        # (POSIX_SPAWN_SETSIGMASK), whatever this thread's.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while (job := self._jobs.get()) is not None:
            spawn, done, failed = job
            try:
                pid = spawn()
            except BaseException as e:
                self._answers.append(functools.partial(failed, e))
            else:
                self._answers.append(functools.partial(done, pid))
            # queued before the flag is looked at: see doRead
            if not self._woken:
                self._woken = True
                self._wake(self._eventfd)

    # -- IReadDescriptor: the eventfd, read in the reactor

    def fileno(self) -> int:
        return self._eventfd

    def logPrefix(self) -> str:
        return "spawn-threads"

    def doRead(self) -> None:
        """Call the answers that came."""
        try:
            os.eventfd_read(self._eventfd)
        except BlockingIOError:
            pass  # nothing to read: the reactor asked anyway
        # cleared after the read (a wake-up written meanwhile is read with it)
        # and before the answers are drained (one queued from now on wakes again)
        self._woken = False
        self._answer()

    def _answer(self) -> None:
        answers = self._answers
        while answers:
            try:
                answers.popleft()()
            except BaseException:  # as the reactor does for callFromThread: the others still run
                log.failure("while answering a spawn:")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The reactor stops: the threads are ended by :meth:`stop`."""

    def stop(self) -> None:
        """End the threads once the spawns asked for are done, answer those, and close."""
        threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            thread.join()
        if threads:
            self.reactor.removeReader(self)
        if self._eventfd >= 0:
            os.close(self._eventfd)
            self._eventfd = -1
        self._answer()


def _spawn_once(spawn: Spawn, program: tuple[bytes, CStrings], env: CStrings, actions: FileActions) -> int:
    try:
        return spawn(*program, env, actions)
    finally:
        actions.release()


@implementer(IProcessTransport, IReadDescriptor)
class SpawnedProcess:
    """
    A child of :class:`FastProcesses`: its protocol's transport, and the
    reader of its pidfd, which becomes readable when it exits.

    Until it runs (its spawn waits in a thread) ``pid`` is ``None`` and its
    protocol is not connected yet; what is asked of it meanwhile (writes,
    closes, signals) is done once it runs, and dropped if it never does.

    :ivar pid: its pid from just before ``makeConnection`` until it was reaped.
    :ivar pgid: its process group (its pid), kept after it was reaped.
    """

    pid: int | None = None
    pgid: int | None = None

    def __init__(
        self,
        processes: FastProcesses,
        protocol: IProcessProtocol,
        pipes: Sequence[tuple[int, str, int, int]],
    ) -> None:
        self._processes = processes
        self.proto: IProcessProtocol | None = protocol
        #: (its descriptor, "r" or "w", this process's end, the child's end) until it runs
        self._new_pipes = pipes
        self.pipes: dict[int, _process.ProcessReader | _process.ProcessWriter] = {}
        self._pidfd = -1
        self._reason: BaseException | None = None
        self._waiting: list[Callable[[], object]] | None = None

    # -- its life, as FastProcesses drives it

    def _run(self, pid: int) -> None:
        """It runs: watch its exit, read and write its pipes, connect its protocol."""
        pipes, self._new_pipes = self._new_pipes, ()
        for _, _, _, child_end in pipes:
            os.close(child_end)
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)  # cannot be watched: never let it run unwatched
            os.waitpid(pid, 0)
            for _, _, end, _ in pipes:
                os.close(end)
            raise
        reactor = self._processes.reactor
        self.pid = self.pgid = pid
        self._processes.live += 1
        reactor.addReader(self)
        for child_fd, kind, end, _ in pipes:
            if kind == "r":
                self.pipes[child_fd] = _process.ProcessReader(reactor, self, child_fd, end)
            else:
                self.pipes[child_fd] = _process.ProcessWriter(
                    reactor, self, child_fd, end, forceReadHack=True
                )
        waiting, self._waiting = self._waiting, None
        protocol = self.proto
        assert protocol is not None  # not ended before it ran
        try:
            protocol.makeConnection(self)
        except BaseException:
            log.failure("while calling makeConnection:")
        for call in waiting or ():
            call()

    def _close_new_pipes(self) -> None:
        """Close both ends of the pipes made for a child that does not run."""
        for _, _, end, child_end in self._new_pipes:
            os.close(end)
            os.close(child_end)
        self._new_pipes = ()

    def _not_run(self, error: BaseException) -> None:
        """Its spawn in a thread failed: its protocol ends, never connected."""
        self._close_new_pipes()
        self._waiting = None
        protocol, self.proto = self.proto, None
        if protocol is not None:
            try:
                protocol.processEnded(Failure(error))
            except BaseException:
                log.failure("while calling processEnded:")

    def _later(self, call: Callable[[], object]) -> bool:
        """Keep ``call`` for when it runs, if it does not yet."""
        if self._waiting is None:
            return False
        self._waiting.append(call)
        return True

    # -- IReadDescriptor: its pidfd

    def fileno(self) -> int:
        return self._pidfd

    def logPrefix(self) -> str:
        return "process"

    def doRead(self) -> None:
        """It exited: reap it, and tell its protocol how."""
        pid = self.pid
        assert pid is not None  # watched only while it runs
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: it exited, how is unknown
            reaped, status = pid, None
        if reaped == 0:
            return
        self.pid = None
        self._processes.live -= 1
        self._reason = reason = exit_reason(status)
        if self.proto is not None:
            try:
                self.proto.processExited(Failure(reason))  # its response goes out now ...
            except BaseException:
                log.failure("while calling processExited:")
        self._unwatch()  # ... before the pidfd is put away
        self._maybe_ended()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._unwatch()  # the reactor stops; a handler still running was ended before

    def _unwatch(self) -> None:
        if self._pidfd >= 0:
            self._processes.reactor.removeReader(self)
            os.close(self._pidfd)
            self._pidfd = -1

    def _maybe_ended(self) -> None:
        # ended once it exited and its pipes are closed (a background child may hold them)
        if self.pipes or self._reason is None or self.proto is None:
            return
        protocol, self.proto = self.proto, None
        try:
            protocol.processEnded(Failure(self._reason))
        except BaseException:
            log.failure("while calling processEnded:")

    # -- what its pipes tell

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if self.proto is not None:
            self.proto.childDataReceived(childFD, data)

    def childConnectionLost(self, childFD: int, reason: Failure) -> None:
        pipe = self.pipes.pop(childFD)
        os.close(pipe.fileno())
        if self.proto is not None:
            try:
                self.proto.childConnectionLost(childFD)
            except BaseException:
                log.failure("while calling childConnectionLost:")
        self._maybe_ended()

    # -- IProcessTransport

    def signalProcess(self, signalID: str | int) -> None:
        if self._later(lambda: self.signalProcess(signalID)):
            return
        number = getattr(signal, f"SIG{signalID}") if isinstance(signalID, str) else signalID
        if self.pid is None:
            raise ProcessExitedAlready()
        try:
            os.kill(self.pid, number)
        except ProcessLookupError:
            raise ProcessExitedAlready() from None

    def writeToChild(self, childFD: int, data: bytes) -> None:
        if not self._later(lambda: self.writeToChild(childFD, data)):
            self.pipes[childFD].write(data)

    def closeChildFD(self, descriptor: int) -> None:
        if not self._later(lambda: self.closeChildFD(descriptor)) and descriptor in self.pipes:
            self.pipes[descriptor].loseConnection()

    def closeStdin(self) -> None:
        self.closeChildFD(0)

    def closeStdout(self) -> None:
        self.closeChildFD(1)

    def closeStderr(self) -> None:
        self.closeChildFD(2)

    def loseConnection(self) -> None:
        self.closeStdin()
        self.closeStderr()
        self.closeStdout()

    def write(self, data: bytes) -> None:
        """Write to its standard input, if it has a pipe there."""
        if not self._later(lambda: self.write(data)) and 0 in self.pipes:
            self.pipes[0].write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._later(lambda: self.registerProducer(producer, streaming)):
            return
        if 0 in self.pipes:
            self.pipes[0].registerProducer(producer, streaming)
        else:
            producer.stopProducing()

    def unregisterProducer(self) -> None:
        if not self._later(self.unregisterProducer) and 0 in self.pipes:
            self.pipes[0].unregisterProducer()

    def pauseProducing(self) -> None:
        for pipe in self.pipes.values():
            if isinstance(pipe, _process.ProcessReader):
                pipe.stopReading()

    def resumeProducing(self) -> None:
        for pipe in self.pipes.values():
            if isinstance(pipe, _process.ProcessReader):
                pipe.startReading()

    def getPeer(self) -> IAddress:
        raise NotImplementedError()

    def getHost(self) -> IAddress:
        raise NotImplementedError()


@implementer(IReactorProcess)
class FastProcesses:
    """
    Children spawned through the C library, in a thread while others of its
    children live, and watched through pidfds (see the module's docstring).
    Available where :meth:`unavailable` says nothing.

    :param reactor: a POSIX reactor: pidfds, pipes and the eventfd that
        spawns in threads are answered through are its readers
        (``IReactorFDSet``).
    :param threads: how many threads may wait in spawns while other
        children live; 0 to spawn from the reactor's thread always, as a
        worker of ``--workers`` does: there the other workers serve while
        one waits, and a thread's hand-offs cost about an eighth of a
        spawning request's CPU time.
    :ivar live: its children that have not exited.
    """

    def __init__(self, reactor: IReactorFDSet, threads: int = SPAWN_THREADS) -> None:
        self.reactor = reactor
        self.threads = threads
        self.live = 0
        self._spawning = 0  # spawns waiting in a thread
        self._spawn: Spawn | None = None
        self._kept_actions: dict[tuple[tuple[int, int | str], ...], FileActions] = {}
        self._shared_environs: dict[int, SharedStrings] = {}
        # made now, so that its eventfd is not counted as a descriptor of a spawn
        self._spawn_threads = SpawnThreads(reactor, threads) if threads else None

    @staticmethod
    def unavailable() -> str | None:
        """Why this system cannot have them, or ``None`` if it can."""
        if not pidfds_work():
            return "no pidfds here"
        return unavailable()

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[AnyStr, AnyStr] | None = NO_ENVIRONMENT,  # type: ignore[assignment]  # empty: fits str and bytes
        path: bytes | str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> SpawnedProcess:
        """
        :meth:`IReactorProcess.spawnProcess` without ``path``, ``uid``,
        ``gid`` and ``usePTY`` (:class:`ValueError`). ``env`` is best an
        :class:`Environ`, whose encoding is kept.

        :raises OSError: if the program cannot be started, when it is
            started at once; from a thread, its protocol ends instead.
        """
        if path is not None or uid is not None or gid is not None or usePTY:
            raise ValueError("path, uid, gid and usePTY are not supported")
        spawn = self._spawn if self._spawn is not None else self._prepare()
        program = c_program(executable, tuple(args))
        c_env = self._c_environ(os.environ if env is None else env)
        child_fds = STDIO_PIPES if childFDs is None else childFDs
        key = tuple(child_fds.items())
        actions = self._kept_actions.get(key)  # descriptors only, laid out so before
        pipes: list[tuple[int, str, int, int]] = []
        if actions is None:
            layout, pipes = _layout(child_fds)
            actions = spawn.file_actions(child_file_steps(layout))
            if actions.kept and not pipes:
                self._kept_actions[key] = actions
        process = SpawnedProcess(self, processProtocol, pipes)
        if self.threads and (self.live or self._spawning):
            if self._spawn_threads is None:
                self._spawn_threads = SpawnThreads(self.reactor, self.threads)
            self._spawning += 1
            process._waiting = []
            self._spawn_threads.run(
                functools.partial(_spawn_once, spawn, program, c_env, actions),
                functools.partial(self._spawned, process),
                functools.partial(self._not_spawned, process),
            )
            return process
        try:
            pid = _spawn_once(spawn, program, c_env, actions)
        except OSError:
            process._close_new_pipes()  # raised to the caller: its protocol is never called
            raise
        process._run(pid)
        return process

    def _c_environ(self, env: Mapping[str, str] | Mapping[bytes, bytes]) -> CStrings:
        """``env`` for the C library; what an :class:`Environ` shares with others, converted once."""
        if not isinstance(env, Environ):
            return c_strings(encoded_environ(env))
        shared = self._shared_environs.get(id(env.shared))
        if shared is None:
            if len(self._shared_environs) >= KEPT_ENVIRONS:
                return c_strings(env.entries)
            # kept, never dropped: a spawn in a thread may be reading a copy of it
            shared = self._shared_environs[id(env.shared)] = SharedStrings(env.shared)
        return shared.followed_by(env.own)

    def _spawned(self, process: SpawnedProcess, pid: int) -> None:
        self._spawning -= 1
        try:
            process._run(pid)
        except OSError as e:  # it could not be watched, and was ended
            process._not_run(e)

    def _not_spawned(self, process: SpawnedProcess, error: BaseException) -> None:
        self._spawning -= 1
        process._not_run(error)

    def _prepare(self) -> Spawn:
        self._spawn = Spawn(prepare_children())
        return self._spawn

    def close(self) -> None:
        """End the spawning threads and free what spawns were prepared with."""
        if self._spawn_threads is not None:
            self._spawn_threads.stop()
            self._spawn_threads = None
        if self._spawn is not None:
            self._kept_actions.clear()
            self._shared_environs.clear()
            self._spawn.close()
            self._spawn = None


def _layout(
    child_fds: Mapping[int, int | str],
) -> tuple[tuple[tuple[int, int], ...], list[tuple[int, str, int, int]]]:
    """
    ``childFDs`` as the descriptors the child gets (pairs of its descriptor
    and this process's), with the pipes made for ``"r"`` and ``"w"``: (its
    descriptor, the kind, this process's end, the child's end).
    """
    layout: list[tuple[int, int]] = []
    pipes: list[tuple[int, str, int, int]] = []
    try:
        for child_fd, target in child_fds.items():
            if isinstance(target, int):
                layout.append((child_fd, target))
            elif target in ("r", "w"):
                read, write = os.pipe()  # both close-on-exec: the child gets its end by dup2
                ours, theirs = (read, write) if target == "r" else (write, read)
                pipes.append((child_fd, target, ours, theirs))
                layout.append((child_fd, theirs))
            else:
                raise ValueError(f"childFDs: {target!r} is not a descriptor, 'r' or 'w'")
    except BaseException:
        for _, _, ours, theirs in pipes:
            os.close(ours)
            os.close(theirs)
        raise
    return tuple(layout), pipes
