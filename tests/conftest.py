from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.kapowserver import KapowServer


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
