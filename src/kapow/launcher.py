"""The fast ``kapow`` launcher the server puts first on its handlers' PATH.

Handlers run ``kapow get`` / ``kapow set`` several times per request.  The pip
console script pays for ``site`` processing, ``.pth`` files and editable-install
finders on each call, several times the interpreter's own start-up.  The
launcher written here runs the interpreter with ``-I -S`` (no ``site``, no
``PYTHON*`` variables), puts the ``kapow`` package's own directory on
``sys.path`` and imports :mod:`kapow.data_client` from there as a top-level
module (it imports nothing of the package), which spares the package import
and a look through the directory the package is installed in (site-packages,
for a regular install); it then calls its ``main`` directly. Every other
sub-command is handed over (``execv``) to the full command line, so
``kapow route ...`` from a handler behaves as usual.

Shebang limit: the kernel reads at most 255 bytes of the ``#!`` line (127 on
Linux before 5.1), and splits it at the first blank only once, so the
interpreter path must be short enough and must not contain whitespace;
:func:`write_launcher` raises ``ValueError`` otherwise.
"""

import os
import sys
import tempfile

import kapow

__all__ = ["MAX_SHEBANG", "launcher_source", "write_launcher"]

#: Longest ``#!`` line (including the newline) the launcher will write.
MAX_SHEBANG = 255

_TEMPLATE = """\
#!{python} -IS
import sys
sys.path.insert(0, {package_dir!r})
if sys.argv[1:2] in (["get"], ["set"]):
    from data_client import main
    sys.exit(main(sys.argv))
import os
os.execv({program!r}, {argv_head} + sys.argv[1:])
"""


def launcher_source(python=None, launcher_path=None):
    """The text of the launcher for interpreter ``python`` (absolute path).

    ``launcher_path`` is where it will live; a console script at that very
    place is not used as the full command line (it would run itself)."""
    python = os.path.abspath(python or sys.executable)
    shebang = "#!%s -IS\n" % python
    if len(os.fsencode(shebang)) > MAX_SHEBANG:
        raise ValueError("interpreter path too long for a #! line (%d bytes max): %s" % (MAX_SHEBANG, python))
    if any(c.isspace() for c in python):
        raise ValueError("interpreter path contains whitespace: %r" % python)
    package_dir = os.path.dirname(os.path.abspath(kapow.__file__))
    script = os.path.join(os.path.dirname(python), "kapow")
    usable = os.path.isfile(script) and os.access(script, os.X_OK)
    if usable and launcher_path is not None:
        usable = os.path.realpath(script) != os.path.realpath(launcher_path)
    if usable:
        program, argv_head = script, repr([script])
    else:
        program, argv_head = python, repr([python, "-m", "kapow"])
    return _TEMPLATE.format(
        python=python,
        package_dir=package_dir,
        program=program,
        argv_head=argv_head,
    )


def write_launcher(directory, python=sys.executable):
    """Write an executable ``kapow`` launcher into ``directory`` (atomically,
    mode 0755) and return its path.  ``python`` is the interpreter it runs."""
    path = os.path.join(directory, "kapow")
    source = launcher_source(python, path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kapow-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(source)
            f.flush()
            os.fchmod(f.fileno(), 0o755)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
