"""
The help of ``kapow server``, rendered in advance so that ``kapow server
--help`` answers without importing Twisted or the server.

:data:`HELP` is what :class:`kapow.server.options.Options` prints for
``--help`` at :data:`WIDTH` columns (a unit test holds them equal). After a
change to the options, render it again with::

    .venv/bin/python -c 'from kapow.server import help_text; help_text.regenerate()'
"""

from __future__ import annotations

#: The columns the help is rendered for.
WIDTH = 80

#: What ``kapow server --help`` prints.
HELP = """\
Usage: kapow server [options] [INIT_PROGRAM ...]
Options:
      --backlog=                    Listen backlog of every listener [default:
                                    the system's, net.core.somaxconn].
      --bind=                       User interface address. [default:
                                    0.0.0.0:8080]
      --body-min-rate=              Bytes per second a request body must
                                    average, after --header-timeout seconds
                                    [default: 500].
      --certfile=                   Certificate (chain) for HTTPS on the user
                                    interface.
      --clientauth                  Require client certificates on the user
                                    interface (HTTPS).
      --clientcafile=               CA bundle user client certificates must
                                    chain to (with --clientauth) [default: the
                                    system CA bundle].
      --control-bind=               Control API address (always mutual TLS).
                                    [default: localhost:8081]
      --control-credentials=        Use server.crt, server.key, client.crt,
                                    client.key from this directory for the
                                    control API instead of generating them (see
                                    `kapow control-credentials`).
      --control-reachable-addr=     HOST:PORT at which init programs reach the
                                    control API; its host goes into the control
                                    certificate. [default: the control bind,
                                    localhost:8081]
      --data-bind=                  Data API address (keep it on loopback).
                                    [default: localhost:8082]
      --data-client=                The kapow get/set that handlers run: native
                                    (the C client built at install), python (the
                                    lean Python client) or auto (native when it
                                    was built). [default: auto]
      --debug                       Log the handlers' stdout and stderr.
  -h, --help                        Display this help and exit.
      --handler-timeout=            Seconds a handler may run when its route
                                    sets no timeout [default: no limit].
      --header-timeout=             Seconds a client has to send a request's
                                    headers, from its first byte [default: 30].
      --history=                    Where the run history is kept: a SQLite
                                    database file, a postgresql:// URI a cluster
                                    shares, or off [default:
                                    $STATE_DIRECTORY/history.sqlite3 under
                                    systemd, else in memory].
      --history-keep=               Run records kept; the oldest beyond are
                                    dropped [default: 10000].
      --idle-timeout=               Seconds a keep-alive connection may wait for
                                    its next request [default: 60].
      --job-output-max=             Bytes of a job's response body kept; past
                                    them it is cut [default: 1M].
      --jobs-path=                  The path under which jobs are asked for,
                                    matched before the routes [default: /_jobs].
      --keep-running-on-disconnect  Leave handlers running when their client
                                    hangs up (routes may override).
      --keyfile=                    Private key for --certfile.
      --kill-grace=                 Seconds between SIGTERM and SIGKILL when
                                    ending a handler [default: 3].
      --limit=                      A resource limit of every handler,
                                    NAME=VALUE (memory, cpu, open_files,
                                    file_size, processes; sizes take K, M, G),
                                    repeatable; a route's own value wins.
      --max-connections=            Connections each listener holds at once;
                                    more are closed at once [default: from the
                                    open files limit].
      --max-handlers=               At most this many handler processes at once;
                                    more requests get 503 [default: no limit].
      --metrics-bind=               Serve Prometheus metrics at /metrics on this
                                    address (plain HTTP) [default: off].
      --queue=                      With --max-handlers: up to this many
                                    requests wait for a free slot instead of a
                                    503 [default: 0].
      --queue-timeout=              Seconds a request may wait in the --queue
                                    before a 503 [default: 30].
      --server-name=                This server's name in the run records, which
                                    a cluster shares [default: the host name].
      --shutdown-timeout=           Seconds a graceful stop waits for running
                                    handlers before ending them [default: 30].
      --spawn=                      How handlers are started: fast (through the
                                    C library, off the reactor's thread, exits
                                    seen through pidfds) or reactor (Twisted's
                                    own processes) [default: fast where this
                                    system has it].
      --trusted-proxies=            CIDR[,CIDR...] of reverse proxies whose
                                    X-Forwarded-For or Forwarded header names
                                    the client.
      --version                     Print the version and exit.
      --workers=                    Worker processes serving the user interface,
                                    or auto: one per CPU this process may use
                                    [default: 1].
      --write-control-credentials=  Write server.crt, client.crt, client.key and
                                    control_url (the control API's URL) into
                                    this directory (mode 0700/0600), for curl
                                    and operator shells;
                                    KAPOW_CONTROL_CREDENTIALS=DIR alone then
                                    reaches the server.

Serve HTTP routes backed by shell commands. Each INIT_PROGRAM is run once the
listeners are up, with KAPOW_CONTROL_URL, KAPOW_DATA_URL and the control
certificates in its environment, and usually calls `kapow route add`. Listener
addresses are HOST:PORT or a Twisted endpoint description (tcp:..., unix:...,
systemd:domain=INET:name=kapow-user).  Example: kapow server --bind
127.0.0.1:8080 examples/hello.pow

"""


def rendered() -> str:
    """The help as :class:`~kapow.server.options.Options` prints it now, at :data:`WIDTH` columns."""
    from kapow.server.options import Options

    options = Options()
    return f"{options.getSynopsis()}\n{options.getUsage(width=WIDTH)}\n"


def regenerate(path: str = __file__) -> None:
    """Write :func:`rendered` into :data:`HELP` in this module's source at ``path``."""
    import ast

    text = rendered()
    if "\\" in text or '"""' in text:
        raise ValueError("the help cannot be kept in a plain triple-quoted string")
    with open(path, encoding="utf-8") as source:
        lines = source.readlines()
    assignment = next(
        node
        for node in ast.parse("".join(lines)).body
        if isinstance(node, ast.Assign) and [ast.unparse(target) for target in node.targets] == ["HELP"]
    )
    lines[assignment.lineno - 1 : assignment.end_lineno] = [f'HELP = """\\\n{text}"""\n']
    with open(path, "w", encoding="utf-8") as source:
        source.writelines(lines)
