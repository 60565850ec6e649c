"""The fast ``kapow`` launcher the server puts first on its handlers' PATH.

Handlers run ``kapow get`` / ``kapow set`` several times per request.  The pip
console script pays for ``site`` processing, ``.pth`` files and editable-install
finders on each call, several times the interpreter's own start-up.  The
launcher written here runs the interpreter with ``-I -S`` (no ``site``, no
``PYTHON*`` variables), puts the folder of the data client on
``sys.path`` and imports :mod:`kapow.commands.data_client` from there as a top-level
module (it imports nothing of the package), which spares the package import
and a look through the directory the package is installed in (site-packages,
for a regular install); it then calls its ``main`` directly. Every other
sub-command is handed over (``execv``) to the full command line, so
``kapow route ...`` from a handler behaves as usual.

When the native client (``native/kapow.c``, compiled by the package's build)
is there, :func:`write_launcher` puts it in the launcher's place instead: it
does ``get``/``set`` itself, costing about what ``/bin/true`` does, and hands
every other sub-command to ``kapow-cli`` beside it, a two-line shell script
that runs the full command line.

Shebang limit: the kernel reads at most 255 bytes of the ``#!`` line (127 on
Linux before 5.1), and splits it at the first blank only once, so the
interpreter path must be short enough and must not contain whitespace;
:func:`write_launcher` raises ``ValueError`` otherwise.
"""

import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import IO

import kapow

__all__ = [
    "FORKSERVER_SOCKET",
    "MAX_SHEBANG",
    "NATIVE_CLIENT",
    "launcher_source",
    "native_client",
    "write_launcher",
]

#: Where the package's build puts the native data client.
NATIVE_CLIENT = os.path.join(os.path.dirname(os.path.abspath(kapow.__file__)), "native", "kapow")

#: The name, beside the native client, of the full command line it hands over to.
FULL_CLI = "kapow-cli"

#: The socket, beside the native client, of :mod:`kapow.commands.forkserver`.
FORKSERVER_SOCKET = "kapow-cli.sock"

#: Longest ``#!`` line (including the newline) the launcher will write.
MAX_SHEBANG = 255

_TEMPLATE = """\
#!{python} -IS
import sys
sys.path.insert(0, {package_dir!r})
if sys.argv[1:2] in (["get"], ["set"], ["unset"]):
    from data_client import main
    sys.exit(main(sys.argv))
import os
os.execv({program!r}, {argv_head} + sys.argv[1:])
"""


def native_client() -> str | None:
    """The path of the native data client when the build made it, else None."""
    return NATIVE_CLIENT if os.access(NATIVE_CLIENT, os.X_OK) else None


def _full_command(python: str, launcher_path: str | None) -> list[str]:
    """The argv head that runs the full command line: the console script
    beside ``python``, or ``python -m kapow``.  A console script at
    ``launcher_path`` is not used (it would run itself)."""
    script = os.path.join(os.path.dirname(python), "kapow")
    usable = os.path.isfile(script) and os.access(script, os.X_OK)
    if usable and launcher_path is not None:
        usable = os.path.realpath(script) != os.path.realpath(launcher_path)
    return [script] if usable else [python, "-m", "kapow"]


def launcher_source(python: str | None = None, launcher_path: str | None = None) -> str:
    """The text of the launcher for interpreter ``python`` (absolute path).

    ``launcher_path`` is where it will live; a console script at that very
    place is not used as the full command line (it would run itself)."""
    python = os.path.abspath(python or sys.executable)
    shebang = "#!%s -IS\n" % python
    if len(os.fsencode(shebang)) > MAX_SHEBANG:
        raise ValueError("interpreter path too long for a #! line (%d bytes max): %s" % (MAX_SHEBANG, python))
    if any(c.isspace() for c in python):
        raise ValueError("interpreter path contains whitespace: %r" % python)
    # the folder of the data client, imported from there as a top-level
    # module: the ``kapow`` package's own ``__init__`` is never run
    package_dir = os.path.dirname(os.path.abspath(__file__))
    head = _full_command(python, launcher_path)
    return _TEMPLATE.format(python=python, package_dir=package_dir, program=head[0], argv_head=repr(head))


def _full_cli_source(python: str, launcher_path: str | None) -> str:
    words = " ".join(shlex.quote(word) for word in _full_command(python, launcher_path))
    return '#!/bin/sh\nexec %s "$@"\n' % words


def write_launcher(directory: str, python: str = sys.executable, native: str | None = None) -> str:
    """Write an executable ``kapow`` into ``directory`` (atomically, mode
    0755) and return its path.  ``python`` is the interpreter of the full
    command line.  With ``native`` (the path of the native client), ``kapow``
    is a copy of it and ``kapow-cli`` the script it hands other commands to;
    else ``kapow`` is the Python launcher."""
    python = os.path.abspath(python)
    path = os.path.join(directory, "kapow")
    os.makedirs(directory, exist_ok=True)
    if native is None:
        _write_atomically(path, lambda f: f.write(launcher_source(python, path).encode("utf-8")))
        return path
    cli = os.path.join(directory, FULL_CLI)
    _write_atomically(cli, lambda f: f.write(_full_cli_source(python, path).encode("utf-8")))
    with open(native, "rb") as source:
        _write_atomically(path, lambda f: shutil.copyfileobj(source, f))
    return path


def _write_atomically(path: str, fill: Callable[[IO[bytes]], object]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".kapow-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fchmod(f.fileno(), 0o755)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
