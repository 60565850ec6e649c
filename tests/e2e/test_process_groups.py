"""kapow.handlers.governor.group_alive on real child processes."""

from __future__ import annotations

import os
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from kapow.handlers.governor import group_alive


class RealGroupAliveTests(SynchronousTestCase):
    def spawn(self) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(["sleep", "30"], start_new_session=True)
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        return child

    def test_live_then_reaped(self) -> None:
        child = self.spawn()
        self.assertEqual(os.getpgid(child.pid), child.pid)
        self.assertTrue(group_alive(child.pid))
        child.kill()
        child.wait()
        self.assertFalse(group_alive(child.pid))

    def test_zombie_is_not_alive(self) -> None:
        child = self.spawn()
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        self.assertFalse(group_alive(child.pid))

    def test_no_such_group(self) -> None:
        with open("/proc/sys/kernel/pid_max") as f:
            pid_max = int(f.read())
        self.assertFalse(group_alive(pid_max))
