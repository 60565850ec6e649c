"""kapow.server.launcher_directory.remove_stale_launcher_dirs: what killed servers left in the temporary directory."""

import os
import subprocess

from kapow.server.launcher_directory import (
    LAUNCHER_OWNER,
    LAUNCHER_PREFIX,
    LauncherDirectory,
    remove_stale_launcher_dirs,
)


def launcher_dir(parent, name, owner):
    path = parent / (LAUNCHER_PREFIX + name)
    path.mkdir()
    (path / "kapow").write_bytes(b"#!/bin/sh\n")
    if owner is not None:
        (path / LAUNCHER_OWNER).write_text(str(owner))
    return path


def dead_pid():
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_only_the_dirs_of_servers_gone_are_removed(tmp_path):
    gone = launcher_dir(tmp_path, "gone", dead_pid())
    running = launcher_dir(tmp_path, "running", os.getpid())
    being_made = launcher_dir(tmp_path, "new", None)
    unreadable = launcher_dir(tmp_path, "odd", "not a pid")
    other = tmp_path / "other-dir"
    other.mkdir()
    assert remove_stale_launcher_dirs(str(tmp_path)) == [str(gone)]
    assert not gone.exists()
    assert all(p.exists() for p in (running, being_made, unreadable, other))


def test_a_launcher_directory_names_its_server_and_goes_when_it_stops(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    gone = launcher_dir(tmp_path, "gone", dead_pid())
    service = LauncherDirectory(None)
    service.startService()
    assert not gone.exists()
    path = service.path
    assert os.path.dirname(path) == str(tmp_path)
    with open(os.path.join(path, LAUNCHER_OWNER)) as f:
        assert int(f.read()) == os.getpid()
    service.stopService()
    assert not os.path.exists(path)
