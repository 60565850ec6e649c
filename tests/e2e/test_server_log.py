"""
The log of a real ``kapow server`` from start to stop, as an operator reads
it: every listener's line and none of Twisted's factory lines, one line
per route added, and init programs that cannot run named with what to do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.kapowserver import KapowServer, curl, write_program


def lines_matching(server: KapowServer, pattern: str) -> list[str]:
    return [line for line in server.lines if re.search(pattern, line)]


@pytest.fixture(scope="module", params=[(), ("--workers", "2")], ids=["one", "workers"])
def started(
    request: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[KapowServer, dict[str, str]]]:
    """
    A server with a metrics listener too, started with an init program
    adding two routes and four that cannot run, and then stopped; with the
    paths of the programs, by what they are.
    """
    tmp_path = tmp_path_factory.mktemp("log")
    programs = {
        "routes": write_program(
            tmp_path / "routes.pow",
            "#!/bin/sh\n"
            "kapow route add /one -c 'echo one | kapow set /response/body'\n"
            "kapow route add /two -c 'echo two | kapow set /response/body'\n",
        ),
        "no #! line": write_program(tmp_path / "no-shebang.pow", "kapow route add /never -c true\n"),
        "no interpreter": write_program(
            tmp_path / "no-interpreter.pow", "#!/nonexistent/sh\nkapow route add /never -c true\n"
        ),
        "not executable": str(tmp_path / "not-executable.pow"),
        "missing": str(tmp_path / "missing.pow"),
    }
    Path(programs["not executable"]).write_text("#!/bin/sh\nkapow route add /never -c true\n")
    server = KapowServer(
        tmp_path / "server", list(programs.values()), ("--metrics-bind", "127.0.0.1:0", *request.param)
    )
    try:
        server.wait_log(rf"\] {re.escape(programs['routes'])} exited with status 0", timeout=30)
        assert curl(server.user + "/two").stdout == "two\n"
    finally:
        assert server.stop() == 0
    yield server, programs


def test_no_factory_lines(started: tuple[KapowServer, dict[str, str]]) -> None:
    server, _ = started
    assert lines_matching(server, r"metrics interface listening on http://127\.0\.0\.1:\d+")
    assert not lines_matching(server, "(Starting|Stopping) factory")
    assert not lines_matching(server, r" object at 0x[0-9a-f]+>")


def test_one_line_per_route_added(started: tuple[KapowServer, dict[str, str]]) -> None:
    server, _ = started
    added = lines_matching(server, "route added")
    assert len(added) == 2, "\n".join(added)
    for pattern in ("/one", "/two"):
        naming = [line for line in added if re.search(rf"url_pattern['\"]: ['\"]{pattern}['\"]", line)]
        assert len(naming) == 1, added


@pytest.mark.parametrize(
    ("kind", "hint"),
    [
        ("no #! line", "cannot be run: it needs a #! line, such as #!/bin/sh, as its first line"),
        ("no interpreter", "cannot be run: the interpreter its #! line names is not there"),
        ("not executable", "is not executable: make it so with chmod +x {path}"),
        ("missing", "not found"),
    ],
)
def test_an_init_program_that_cannot_run_is_named_with_what_to_do(
    started: tuple[KapowServer, dict[str, str]], kind: str, hint: str
) -> None:
    server, programs = started
    path = programs[kind]
    expected = f"[kapow.server.init_programs#error] init program {path} {hint.format(path=path)}"
    mentions = [line for line in server.lines if path in line]
    assert len(mentions) == 1 and mentions[0].endswith(expected), mentions
