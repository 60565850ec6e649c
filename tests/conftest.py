from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.support.kapowserver import KapowServer


@pytest.fixture(autouse=True)
def trial_temporary_paths(request: pytest.FixtureRequest) -> None:
    """
    Trial's ``TestCase.mktemp()`` makes its paths under the working
    directory, which trial sets to ``_trial_temp`` and pytest leaves at the
    checkout: run by pytest, a trial test case gets them under its
    ``tmp_path`` instead.
    """
    case = request.instance
    if isinstance(case, SynchronousTestCase):
        directory = request.getfixturevalue("tmp_path")
        case.mktemp = lambda: str(Path(tempfile.mkdtemp(dir=directory)) / "temp")  # type: ignore[method-assign]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    """Start real servers for a test; they are stopped after it."""
    servers: list[KapowServer] = []

    def start(*init_programs: str, extra: tuple[str, ...] = (), **kw: Any) -> KapowServer:
        server = KapowServer(tmp_path / f"s{len(servers)}", init_programs, extra, **kw)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server: Any) -> KapowServer:
    """A running server with no routes."""
    return start_server()
