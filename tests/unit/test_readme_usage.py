"""
The README's Usage block shows every long option that a command's own
``--help`` shows, on that command's lines: the real ``kapow ... --help`` is
run for each command.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.kapowserver import KAPOW

README = Path(__file__).resolve().parents[2] / "README.md"

COMMANDS = [
    ("server",),
    ("route", "add"),
    ("route", "list"),
    ("route", "get"),
    ("route", "remove"),
    ("handler", "list"),
    ("handler", "get"),
    ("handler", "kill"),
    ("history",),
    ("get",),
    ("set",),
    ("unset",),
    ("control-credentials",),
]

#: An option's own line in a help text (argparse's, Twisted's, or the lean
#: client's): a little indentation, a short form perhaps, then the long one.
#: Descriptions wrap deeper, so a flag they mention is not taken for one.
_OPTION_LINE = re.compile(r"^ {1,6}(?:-\w[^,\s]*(?: \S+)?, )?(--[a-z][a-z0-9-]*)", re.MULTILINE)


def help_flags(command: tuple[str, ...]) -> set[str]:
    """The long options ``kapow COMMAND --help`` describes, ``--help`` aside."""
    result = subprocess.run([KAPOW, *command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    flags = set(_OPTION_LINE.findall(result.stdout))
    assert "--help" in flags, result.stdout  # the help was read as help
    return flags - {"--help"}


def usage_entries() -> list[str]:
    """The Usage block's entries: a line naming a command, with the indented lines after it."""
    block = README.read_text().split("## Usage\n", 1)[1].split("```", 2)[1]
    entries: list[str] = []
    for line in block.splitlines():
        if line.startswith(" ") and entries:
            entries[-1] += "\n" + line
        elif line.strip():
            entries.append(line)
    return entries


def usage_of(command: tuple[str, ...]) -> str:
    """
    The entries of ``kapow COMMAND``: those whose head (up to the first
    ``[``) names it; ``kapow route list | get ID | remove ID`` names three.
    """
    group, *sub = command
    found = []
    for entry in usage_entries():
        words = entry.split("[", 1)[0].replace("|", " ").split()
        if words[:2] == ["kapow", group] and all(name in words[2:] for name in sub):
            found.append(entry)
    assert found, f"the README's Usage block has no line for kapow {' '.join(command)}"
    return "\n".join(found)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_the_usage_block_shows_every_long_option_of_the_command(command: tuple[str, ...]) -> None:
    usage = usage_of(command)
    missing = sorted(
        flag for flag in help_flags(command) if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", usage)
    )
    assert not missing, f"kapow {' '.join(command)}: the README's Usage block leaves out {', '.join(missing)}"
