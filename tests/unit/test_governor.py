"""
Tests for kapow.handlers.governor: refusing while stopping, deadlines, ending process groups and
draining, on a fake clock with fake process groups (no real signals). The
real group_alive() on real child processes: tests/e2e/test_process_groups.py.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from kapow.core.routes import Route
from kapow.handlers.governor import POLL_INTERVAL, Governor, Limits

TERM, KILL = signal.SIGTERM, signal.SIGKILL


def route(route_id: str = "r1", **kw: Any) -> Route:
    return Route(id=route_id, method="GET", url_pattern="/" + route_id, **kw)


class FakeGroups:
    """
    Process groups that exist only in ``alive``; every signal sent is
    recorded, none is delivered.
    """

    def __init__(self, *alive: int) -> None:
        self.alive = set(alive)
        self.signals: list[tuple[int, int]] = []

    def group_alive(self, pgid: int) -> bool:
        return pgid in self.alive

    def signal_group(self, pgid: int, sig: int) -> bool:
        self.signals.append((pgid, sig))
        return pgid in self.alive


class GovernorTestCase(SynchronousTestCase):
    def make(self, *alive: int, **limits: Any) -> Governor:
        self.clock = Clock()
        self.groups = FakeGroups(*alive)
        self.timeouts: list[tuple[str, float]] = []
        return Governor(
            self.clock,
            Limits(**limits),
            group_alive=self.groups.group_alive,
            signal_group=self.groups.signal_group,
        )

    def start(self, governor: Governor, handler_id: str, r: Route, pgid: int | None) -> None:
        governor.started(
            handler_id,
            r,
            pgid,
            lambda elapsed: self.timeouts.append((handler_id, elapsed)),
        )

    def poll(self, steps: int = 1) -> None:
        for _ in range(steps):
            self.clock.advance(POLL_INTERVAL)


class AdmissionTests(GovernorTestCase):
    def test_stopping_refuses_everything(self) -> None:
        governor = self.make()
        governor.stopping = True
        for r in (route(), route("r2", max_concurrency=9)):
            why = governor.admit(r)
            assert why is not None
            self.assertIn("stopping", why)

    def test_limits_are_not_the_governors(self) -> None:
        governor = self.make()
        limited = route(max_concurrency=1)
        self.start(governor, "a", limited, 10)
        self.assertIsNone(governor.admit(limited))  # kapow.handlers.admission applies max_concurrency

    def test_stop_admitting_tells_once(self) -> None:
        governor = self.make()
        told: list[bool] = []
        governor.on_stopping.append(lambda: told.append(governor.stopping))
        governor.stop_admitting()
        governor.stop_admitting()
        self.assertEqual(told, [True])
        self.assertIsNotNone(governor.admit(route()))

    def test_pid_and_start_of_a_running_handler(self) -> None:
        governor = self.make()
        self.clock.advance(12.5)
        self.start(governor, "a", route(), 4242)
        self.assertEqual((governor.pid("a"), governor.started_at("a")), (4242, 12.5))
        governor.exited("a")
        self.assertEqual((governor.pid("a"), governor.started_at("a")), (None, None))

    def test_running_counts(self) -> None:
        governor = self.make()
        self.assertEqual(governor.running(), 0)
        self.start(governor, "a", route(), 10)
        self.start(governor, "b", route("r2"), 11)
        self.assertEqual(governor.running(), 2)
        governor.exited("a")
        self.assertEqual(governor.running(), 1)
        governor.exited("a")
        self.assertEqual(governor.running(), 1)
        governor.exited("b")
        self.assertEqual(governor.running(), 0)


class DeadlineTests(GovernorTestCase):
    def test_route_timeout(self) -> None:
        governor = self.make()
        self.clock.advance(100)
        self.start(governor, "a", route(timeout=2.5), 10)
        self.clock.advance(2.4)
        self.assertEqual(self.timeouts, [])
        self.clock.advance(0.2)
        [(handler_id, elapsed)] = self.timeouts
        self.assertEqual(handler_id, "a")
        self.assertAlmostEqual(elapsed, 2.6)
        self.clock.advance(100)
        self.assertEqual(len(self.timeouts), 1)

    def test_no_timeout_no_timer(self) -> None:
        governor = self.make()
        self.start(governor, "a", route(), 10)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10_000)
        self.assertEqual(self.timeouts, [])

    def test_server_default_timeout(self) -> None:
        governor = self.make(handler_timeout=5.0)
        self.start(governor, "a", route(), 10)
        self.clock.advance(4.9)
        self.assertEqual(self.timeouts, [])
        self.clock.advance(0.1)
        self.assertEqual([h for h, _ in self.timeouts], ["a"])
        self.assertAlmostEqual(self.timeouts[0][1], 5.0)

    def test_route_timeout_wins_over_default(self) -> None:
        for route_timeout in (1.0, 20.0):
            governor = self.make(handler_timeout=5.0)
            self.start(governor, "a", route(timeout=route_timeout), 10)
            self.clock.advance(route_timeout - 0.01)
            self.assertEqual(self.timeouts, [], route_timeout)
            self.clock.advance(0.02)
            self.assertEqual([h for h, _ in self.timeouts], ["a"], route_timeout)

    def test_exited_cancels_timer_and_returns_elapsed(self) -> None:
        governor = self.make(10)
        self.clock.advance(7)
        self.start(governor, "a", route(timeout=3), 10)
        self.clock.advance(1.25)
        self.assertAlmostEqual(governor.exited("a"), 1.25)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.timeouts, [])

    def test_exited_after_timeout(self) -> None:
        governor = self.make()
        self.start(governor, "a", route(timeout=1), 10)
        self.clock.advance(1.5)
        self.assertEqual(len(self.timeouts), 1)
        self.assertAlmostEqual(governor.exited("a"), 1.5)
        self.assertEqual(governor.running(), 0)

    def test_exited_unknown_id(self) -> None:
        governor = self.make()
        self.start(governor, "a", route(max_concurrency=1), 10)
        self.assertEqual(governor.exited("nobody"), 0.0)
        self.assertEqual(governor.running(), 1)
        governor.exited("a")
        self.assertEqual(governor.exited("a"), 0.0)
        self.assertEqual(governor.running(), 0)


class DisconnectPolicyTests(GovernorTestCase):
    def test_route_against_server_default(self) -> None:
        for default in (False, True):
            governor = self.make(keep_running_on_disconnect=default)
            self.assertIs(
                governor.keeps_running_on_disconnect(route(keep_running_on_disconnect=True)),
                True,
            )
            self.assertIs(
                governor.keeps_running_on_disconnect(route(keep_running_on_disconnect=False)),
                False,
            )
            self.assertIs(governor.keeps_running_on_disconnect(route()), default)


class EndingGroupsTests(GovernorTestCase):
    def test_terminate_escalates_to_sigkill(self) -> None:
        governor = self.make(10, kill_grace=1.0)
        self.start(governor, "a", route(), 10)
        done = governor.terminate("a")
        self.assertEqual(self.groups.signals, [(10, TERM)])
        self.poll(19)
        self.assertNoResult(done)
        self.assertEqual(self.groups.signals, [(10, TERM)])
        self.poll(2)
        self.assertEqual(self.groups.signals, [(10, TERM), (10, KILL)])
        self.poll(5)
        self.assertNoResult(done)
        self.assertEqual(self.groups.signals, [(10, TERM), (10, KILL)])
        self.groups.alive.discard(10)
        self.poll()
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_group_dying_after_sigterm_gets_no_sigkill(self) -> None:
        governor = self.make(10, kill_grace=1.0)
        self.start(governor, "a", route(), 10)
        done = governor.terminate("a")
        self.poll(3)
        self.assertNoResult(done)
        self.groups.alive.discard(10)
        self.poll()
        self.successResultOf(done)
        self.clock.advance(10)
        self.assertEqual(self.groups.signals, [(10, TERM)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_terminate_cancels_the_deadline(self) -> None:
        governor = self.make(10, kill_grace=1.0)
        self.start(governor, "a", route(timeout=2), 10)
        governor.terminate("a")
        self.groups.alive.discard(10)
        self.clock.advance(5)
        self.assertEqual(self.timeouts, [])

    def test_terminate_unknown_id(self) -> None:
        governor = self.make()
        self.successResultOf(governor.terminate("nobody"))
        self.assertEqual(self.groups.signals, [])

    def test_terminate_uses_the_runs_own_group(self) -> None:
        governor = self.make(10, 11, kill_grace=1.0)
        self.start(governor, "a", route(), 10)
        self.start(governor, "b", route(), 11)
        self.groups.alive.discard(11)
        governor.terminate("b")
        self.assertEqual(self.groups.signals, [(11, TERM)])

    def test_end_groups_on_a_vanished_group(self) -> None:
        governor = self.make(kill_grace=1.0)
        done = governor.end_groups({42})
        self.successResultOf(done)
        self.clock.advance(10)
        self.assertEqual(self.groups.signals, [(42, TERM)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_end_groups_grace_argument(self) -> None:
        governor = self.make(5, 6, kill_grace=100.0)
        done = governor.end_groups({5, 6}, grace=0)
        self.assertEqual(set(self.groups.signals), {(5, TERM), (5, KILL), (6, TERM), (6, KILL)})
        self.groups.alive.discard(5)
        self.poll()
        self.assertNoResult(done)
        self.groups.alive.discard(6)
        self.poll()
        self.successResultOf(done)


class DrainTests(GovernorTestCase):
    def test_nothing_running(self) -> None:
        governor = self.make()
        self.successResultOf(governor.drain(30))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fires_when_the_last_run_exits(self) -> None:
        governor = self.make()
        self.start(governor, "a", route(), 10)
        self.start(governor, "b", route(), 11)
        drained = governor.drain(30)
        governor.exited("a")
        self.assertNoResult(drained)
        self.clock.advance(5)
        governor.exited("b")
        self.successResultOf(drained)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(30)

    def test_fires_at_the_timeout(self) -> None:
        governor = self.make()
        self.start(governor, "a", route(), 10)
        drained = governor.drain(30)
        self.clock.advance(29.9)
        self.assertNoResult(drained)
        self.clock.advance(0.1)
        self.successResultOf(drained)
        self.assertEqual(governor.running(), 1)

    def test_several_drains(self) -> None:
        governor = self.make()
        self.start(governor, "a", route(), 10)
        first, second = governor.drain(10), governor.drain(20)
        governor.exited("a")
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_run_exiting_after_the_drain_timed_out(self) -> None:
        governor = self.make(10)
        self.start(governor, "a", route(), 10)
        drained = governor.drain(5)
        self.clock.advance(5)
        self.successResultOf(drained)
        self.assertAlmostEqual(governor.exited("a"), 5.0)
        self.assertEqual(governor.running(), 0)

    def test_run_exiting_after_the_drain_was_cut_short(self) -> None:
        governor = self.make(10)
        self.start(governor, "a", route(), 10)
        drained = governor.drain(30)
        drained.callback(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        governor.exited("a")
        self.assertEqual(governor.running(), 0)


class EndAllTests(GovernorTestCase):
    def test_running_and_left_behind_groups(self) -> None:
        governor = self.make(10, 20, 30, kill_grace=1.0)
        self.start(governor, "running", route(), 10)
        self.start(governor, "left-behind", route(), 20)
        self.start(governor, "gone", route(), 30)
        governor.exited("left-behind")
        self.groups.alive.discard(30)
        governor.exited("gone")
        self.groups.alive.add(30)  # a later, unrelated group with the same id
        done = governor.end_all()
        self.assertEqual(set(self.groups.signals), {(10, TERM), (20, TERM)})
        self.groups.alive -= {10, 20}
        self.poll()
        self.successResultOf(done)
        self.assertEqual(set(self.groups.signals), {(10, TERM), (20, TERM)})

    def test_ended_groups_are_forgotten(self) -> None:
        governor = self.make(20, kill_grace=1.0)
        self.start(governor, "a", route(), 20)
        governor.exited("a")
        done = governor.end_all()
        self.groups.alive.discard(20)
        self.poll()
        self.successResultOf(done)
        self.groups.signals.clear()
        self.successResultOf(governor.end_all())
        self.assertEqual(self.groups.signals, [])

    def test_escalates_after_grace(self) -> None:
        governor = self.make(10, 20, kill_grace=3.0)
        self.start(governor, "a", route(), 10)
        self.start(governor, "b", route(), 20)
        governor.exited("b")
        done = governor.end_all(grace=0.5)
        self.groups.alive.discard(10)
        self.poll(11)
        self.assertEqual(set(self.groups.signals), {(10, TERM), (20, TERM), (20, KILL)})
        self.assertNoResult(done)
        self.groups.alive.discard(20)
        self.poll()
        self.successResultOf(done)

    def test_nothing_to_end(self) -> None:
        governor = self.make()
        self.successResultOf(governor.end_all())
        self.assertEqual(self.groups.signals, [])


class BeingSpawnedTests(GovernorTestCase):
    """A handler whose process is still being spawned (no group yet)."""

    def test_it_runs_from_the_start(self) -> None:
        governor = self.make()
        self.start(governor, "a", route(max_concurrency=1), None)
        self.assertEqual((governor.running(), governor.pid("a")), (1, None))
        governor.spawned("a", 10)
        self.assertEqual((governor.running(), governor.pid("a")), (1, 10))
        governor.exited("a")
        self.assertEqual(governor.running(), 0)

    def test_terminated_before_its_group_is_known(self) -> None:
        governor = self.make(10, kill_grace=1.0)
        self.start(governor, "a", route(), None)
        self.successResultOf(governor.terminate("a"))
        self.assertEqual(self.groups.signals, [])
        governor.spawned("a", 10)
        self.assertEqual(self.groups.signals, [(10, TERM)])

    def test_a_spawn_that_failed_is_forgotten(self) -> None:
        governor = self.make()
        self.start(governor, "a", route(), None)
        governor.exited("a")
        governor.spawned("a", 10)  # too late: nothing to track
        self.assertEqual(governor.running(), 0)

    def test_end_all_waits_for_the_group(self) -> None:
        governor = self.make(10, kill_grace=1.0)
        self.start(governor, "a", route(), None)
        done = governor.end_all()
        self.poll()
        self.assertEqual(self.groups.signals, [])
        governor.spawned("a", 10)
        self.poll()
        self.assertEqual(self.groups.signals, [(10, TERM)])
        self.groups.alive.discard(10)
        self.poll()
        self.successResultOf(done)


def test_one_scan_answers_for_every_group_asked_about_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from kapow.handlers import governor as governor_module

    scans: list[int] = []
    real = governor_module.processes

    def counted() -> Any:
        scans.append(1)
        return real()

    monkeypatch.setattr(governor_module, "processes", counted)
    children = [subprocess.Popen(["sleep", "30"], start_new_session=True) for _ in range(3)]
    try:
        clock = Clock()
        scan = governor_module.GroupScan(clock, fresh=0.025)
        assert [scan(child.pid) for child in children] == [True, True, True]
        assert len(scans) == 1
        children[0].kill()
        children[0].wait()
        assert scan(children[0].pid) is False  # no member at all: no scan needed
        clock.advance(0.03)
        assert scan(children[1].pid) is True
        assert len(scans) == 2
    finally:
        for child in children:
            child.kill()
            child.wait()
