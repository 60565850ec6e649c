"""
The options of ``kapow server`` / ``twist kapow`` (docs/reference/cli.rst).

Every option is declared once, in :class:`Options`' tables, with its default
and its validator in the coerce column: a value on the command line is
checked and converted as it is read, and ``dict(options)`` holds the values
the assembly (:mod:`kapow.server.assembly`) builds from. Only the checks that
look at several options at once are left to :meth:`Options.postOptions`.

Options are read wherever they stand among the init programs, up to a ``--``,
as the reference reads them; its boolean options also take a value
(``--clientauth=false``, or ``--clientauth false`` as the reference's
documentation writes it).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.python import usage

from kapow.commands.launcher import native_client
from kapow.core import credentials
from kapow.core.auth import Network
from kapow.core.resource_limits import InvalidLimit, LimitedCommand, parse_limit, parse_size
from kapow.core.routes import DEFAULT_QUEUE_TIMEOUT, MAX_QUEUE
from kapow.core.runs import DEFAULT_KEEP
from kapow.handlers.fast_processes import FastProcesses
from kapow.handlers.spawn import SPAWN_KINDS
from kapow.server.service import StartupError
from kapow.user.jobs import DEFAULT_JOB_OUTPUT_MAX, DEFAULT_JOBS_PATH
from kapow.user.proxies import parse_trusted_proxies

__all__ = ["WORKER_OPTION", "Options", "control_reachable_addr", "parse_listen_address"]

_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]+)")
_ENDPOINT_TYPES = {"tcp", "tcp6", "unix", "systemd"}

#: The hidden option that makes the server one worker of ``--workers N``.
WORKER_OPTION = "--worker"

#: The values of ``--data-client``.
DATA_CLIENTS = ("auto", "native", "python")

#: The spellings of a boolean option's value: Go's ``strconv.ParseBool``, as the reference reads them.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})

#: The words that, right after a boolean option, are its value rather than an init program.
_LONE_VALUES = ("true", "false")


def parse_listen_address(addr: str) -> tuple[str, str | None]:
    """
    Turn a listener flag into a Twisted endpoint description.

    The reference's ``host:port`` form (``0.0.0.0:8080``, ``localhost:8081``,
    ``[::1]:8082``, ``:8080`` for every interface) is accepted, and so is any
    endpoint description whose type is one of ``tcp``, ``tcp6``, ``unix``,
    ``systemd``, and either of the first three (or ``HOST:PORT``) behind
    ``haproxy:`` for the PROXY protocol (TLS comes from ``--certfile``/``--keyfile`` and, for the
    control API, always; never from the description).

    :return: the description and the host as written (``None`` for an
        endpoint description or an empty host).
    :raises StartupError: for anything else.
    """
    kind = addr.split(":", 1)[0]
    if kind == "haproxy":
        inner, host = parse_listen_address(addr[len("haproxy:") :])
        if inner.startswith(("haproxy:", "systemd:")):
            raise StartupError(f"{addr!r}: haproxy: wraps a tcp, tcp6, unix or HOST:PORT address")
        return "haproxy:" + inner, host
    if kind in _ENDPOINT_TYPES:
        return addr, None
    if kind in ("ssl", "tls"):
        raise StartupError(f"{addr!r}: TLS comes from --certfile/--keyfile, not from an {kind}: endpoint")
    m = _HOST_PORT.fullmatch(addr)
    if m is None:
        raise StartupError(f"invalid address {addr!r}: expected HOST:PORT or an endpoint description")
    port = int(m["port"])
    if port > 65535:
        raise StartupError(f"invalid address {addr!r}: port out of range")
    if m["v6"] is not None:
        if not _is_ipv6(m["v6"]):
            raise StartupError(f"invalid address {addr!r}: not an IPv6 address")
        return f"tcp6:port={port}:interface={_escape(m['v6'])}", m["v6"]
    host = m["host"]
    if not host:
        return f"tcp:port={port}", None
    return f"tcp:port={port}:interface={_escape(host)}", host


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def control_reachable_addr(options: Options) -> str:
    """
    The ``HOST:PORT`` at which init programs and handlers reach the control
    API: ``--control-reachable-addr``, else the host and port of
    ``--control-bind`` (``localhost`` for every interface), else
    ``localhost:8081``.
    """
    if options["control-reachable-addr"] is not None:
        return str(options["control-reachable-addr"])
    _, host = parse_listen_address(options["control-bind"])
    m = _HOST_PORT.fullmatch(options["control-bind"])
    if host is None or m is None:
        return "localhost:8081"
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    return f"[{host}]:{m['port']}" if ":" in host else f"{host}:{m['port']}"


def boolean(flag: str, value: str) -> int:
    """The value of boolean option ``--flag``: 1 or 0, as Twisted keeps flags."""
    if value in _TRUE:
        return 1
    if value in _FALSE:
        return 0
    raise usage.UsageError(f"--{flag} must be true or false, not {value!r}")


# -- validators: the coerce column of Options.optParameters ---------------------
# Each raises UsageError itself: twisted.python.usage would prefix a ValueError's
# message with "Parameter type enforcement failed".


@dataclass(frozen=True)
class Number:
    """
    A finite number of ``kind`` for ``--flag``: at least ``minimum`` (and at
    most ``maximum``), or, without a minimum, above zero.
    """

    flag: str
    kind: type[int] | type[float]
    minimum: int | float | None = None
    maximum: int | None = None

    def __call__(self, value: str) -> int | float:
        try:
            number = self.kind(value)
        except ValueError:
            raise usage.UsageError(f"--{self.flag} must be {self._a_number}, not {value!r}") from None
        if self.minimum is None:
            if not math.isfinite(number) or number <= 0:
                raise usage.UsageError(f"--{self.flag} must be a positive number, not {value!r}")
        elif not math.isfinite(number) or number < self.minimum:
            raise usage.UsageError(f"--{self.flag} must be at least {self.minimum}")
        if self.maximum is not None and number > self.maximum:
            raise usage.UsageError(f"--{self.flag} must be at most {self.maximum}")
        return number

    @property
    def _a_number(self) -> str:
        return "a number" if self.minimum is not None else "a positive number"


@dataclass(frozen=True)
class ListenAddress:
    """
    A listener address for ``--flag`` (:func:`parse_listen_address`), kept as
    written; ``tcp_only``: not a Unix socket; ``proxied``: may be behind ``haproxy:``.
    """

    flag: str
    tcp_only: bool = False
    proxied: bool = True

    def __call__(self, value: str) -> str:
        if self.tcp_only and value.startswith("unix:"):
            raise usage.UsageError(f"--{self.flag} must be a TCP address: kapow route reaches it over TCP")
        if not self.proxied and value.startswith("haproxy:"):
            raise usage.UsageError(f"--{self.flag}: the PROXY protocol is for --bind only")
        try:
            parse_listen_address(value)
        except StartupError as e:
            raise usage.UsageError(str(e)) from None
        return value


def reachable_addr(value: str) -> str:
    """``--control-reachable-addr``: a ``HOST:PORT`` whose host can go into a certificate."""
    try:
        credentials.reachable_host(value)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
    return value


def data_client(value: str) -> str:
    """``--data-client``: one of :data:`DATA_CLIENTS`, the native one only if it was built."""
    if value not in DATA_CLIENTS:
        raise usage.UsageError(f"--data-client must be auto, native or python, not {value!r}")
    if value == "native" and native_client() is None:
        raise usage.UsageError(
            "--data-client native: the native client was not built (no C compiler at install?)"
        )
    return value


def usable_cpus() -> int:
    """How many CPUs this process may use (what ``--workers auto`` counts)."""
    return len(os.sched_getaffinity(0))


def workers(value: str) -> int:
    """``--workers``: a count of at least 1, or ``auto``: the CPUs this process may use."""
    if value == "auto":
        return usable_cpus()
    try:
        number = int(value)
    except ValueError:
        raise usage.UsageError(f"--workers must be a number or auto, not {value!r}") from None
    if number < 1:
        raise usage.UsageError("--workers must be at least 1")
    return number


def trusted_proxies(value: str) -> tuple[Network, ...]:
    """``--trusted-proxies``: ``CIDR[,CIDR...]``."""
    try:
        return parse_trusted_proxies(value)
    except ValueError as e:
        raise usage.UsageError(f"--trusted-proxies: {e}") from None


#: ``--history``'s value that keeps no history.
HISTORY_OFF = "off"


def history_location(value: str) -> str:
    """``--history``: ``off``, or the path of a database file (not checked here: it is opened at start)."""
    if not value.strip():
        raise usage.UsageError("--history: give a database file, or off")
    return value


def history_path(options: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    """
    The database file of the history (``None``: in memory), or
    :data:`HISTORY_OFF`: ``--history``, else ``history.sqlite3`` in the
    directory systemd's ``StateDirectory=`` gives (``$STATE_DIRECTORY``).
    """
    given: str | None = options["history"]
    if given is not None:
        return given
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    return os.path.join(state, "history.sqlite3") if state else None


def server_name(value: str) -> str:
    """``--server-name``: any text without control characters."""
    if not value.strip() or any(c < " " or c == "\x7f" for c in value):
        raise usage.UsageError("--server-name must be a name, without control characters")
    return value


def job_output_max(value: str) -> int:
    """``--job-output-max``: bytes, with an optional K, M or G suffix."""
    try:
        return parse_size(value)
    except ValueError as e:
        raise usage.UsageError(f"--job-output-max: {e}") from None


def jobs_path(value: str) -> str:
    """``--jobs-path``: a path of its own, such as ``/_jobs``."""
    path = value.rstrip("/")
    if not path.startswith("/") or "?" in path or "#" in path or any(c <= " " for c in path):
        raise usage.UsageError(f"--jobs-path must be a path such as /_jobs, not {value!r}")
    return path


class Options(usage.Options):
    """
    Options of ``kapow server`` / ``twist kapow``.

    A help text that states its option's default (``[default: 3]``) shows
    it in its own words; Twisted adds ``[default: ...]`` to the others.
    """

    #: What follows the command (``kapow server``, ``twist kapow``) in the usage line.
    synopsis = "[options] [INIT_PROGRAM ...]"
    longdesc = (
        "Serve HTTP routes backed by shell commands. Each INIT_PROGRAM is run once "
        "the listeners are up, with KAPOW_CONTROL_URL, KAPOW_DATA_URL and the "
        "control certificates in its environment, and usually calls `kapow route add`. "
        "Listener addresses are HOST:PORT or a Twisted endpoint description "
        "(tcp:..., unix:..., systemd:domain=INET:name=kapow-user).\n\n"
        "Example: kapow server --bind 127.0.0.1:8080 examples/hello.pow"
    )

    # name, short, default, help, coerce
    optParameters = [
        # -- listeners
        ["bind", None, "0.0.0.0:8080", "User interface address.", ListenAddress("bind")],
        [
            "control-bind",
            None,
            "localhost:8081",
            "Control API address (always mutual TLS).",
            ListenAddress("control-bind", tcp_only=True),
        ],
        [
            "data-bind",
            None,
            "localhost:8082",
            "Data API address (keep it on loopback).",
            ListenAddress("data-bind"),
        ],
        [
            "control-reachable-addr",
            None,
            None,
            "HOST:PORT at which init programs reach the control API; its host goes into "
            "the control certificate. [default: the control bind, localhost:8081]",
            reachable_addr,
        ],
        [
            "metrics-bind",
            None,
            None,
            "Serve Prometheus metrics at /metrics on this address (plain HTTP) [default: off].",
            ListenAddress("metrics-bind", proxied=False),
        ],
        [
            "workers",
            None,
            1,
            "Worker processes serving the user interface, or auto: one per CPU this process "
            "may use [default: 1].",
            workers,
        ],
        # hidden (see getUsage): the main process of --workers starts its workers with it
        ["worker", None, None, "", int],
        # -- certificates
        ["certfile", None, None, "Certificate (chain) for HTTPS on the user interface."],
        ["keyfile", None, None, "Private key for --certfile."],
        [
            "clientcafile",
            None,
            None,
            "CA bundle user client certificates must chain to (with --clientauth) "
            "[default: the system CA bundle].",
        ],
        [
            "control-credentials",
            None,
            None,
            "Use server.crt, server.key, client.crt, client.key from this directory "
            "for the control API instead of generating them (see `kapow control-credentials`).",
        ],
        [
            "write-control-credentials",
            None,
            None,
            "Write server.crt, client.crt, client.key and control_url (the control API's URL) "
            "into this directory (mode 0700/0600), for curl and operator shells; "
            "KAPOW_CONTROL_CREDENTIALS=DIR alone then reaches the server.",
        ],
        # -- handlers
        [
            "data-client",
            None,
            "auto",
            "The kapow get/set that handlers run: native (the C client built at install), "
            "python (the lean Python client) or auto (native when it was built).",
            data_client,
        ],
        [
            "handler-timeout",
            None,
            None,
            "Seconds a handler may run when its route sets no timeout [default: no limit].",
            Number("handler-timeout", float, minimum=0.001),
        ],
        [
            "kill-grace",
            None,
            3.0,
            "Seconds between SIGTERM and SIGKILL when ending a handler [default: 3].",
            Number("kill-grace", float, minimum=0),
        ],
        [
            "max-handlers",
            None,
            None,
            "At most this many handler processes at once; more requests get 503 [default: no limit].",
            Number("max-handlers", int, minimum=1),
        ],
        [
            "queue",
            None,
            0,
            "With --max-handlers: up to this many requests wait for a free slot instead of a 503 "
            "[default: 0].",
            Number("queue", int, minimum=0, maximum=MAX_QUEUE),
        ],
        [
            "queue-timeout",
            None,
            DEFAULT_QUEUE_TIMEOUT,
            "Seconds a request may wait in the --queue before a 503 [default: 30].",
            Number("queue-timeout", float, minimum=0.001),
        ],
        [
            "shutdown-timeout",
            None,
            30.0,
            "Seconds a graceful stop waits for running handlers before ending them [default: 30].",
            Number("shutdown-timeout", float, minimum=0),
        ],
        [
            "history",
            None,
            None,
            "Where the run history is kept: a SQLite database file, a postgresql:// URI a cluster "
            "shares, or off [default: $STATE_DIRECTORY/history.sqlite3 under systemd, else in memory].",
            history_location,
        ],
        [
            "history-keep",
            None,
            DEFAULT_KEEP,
            "Run records kept; the oldest beyond are dropped [default: 10000].",
            Number("history-keep", int, minimum=1),
        ],
        [
            "job-output-max",
            None,
            DEFAULT_JOB_OUTPUT_MAX,
            "Bytes of a job's response body kept; past them it is cut [default: 1M].",
            job_output_max,
        ],
        [
            "jobs-path",
            None,
            DEFAULT_JOBS_PATH,
            "The path under which jobs are asked for, matched before the routes [default: /_jobs].",
            jobs_path,
        ],
        [
            "server-name",
            None,
            None,
            "This server's name in the run records, which a cluster shares [default: the host name].",
            server_name,
        ],
        [
            "trusted-proxies",
            None,
            None,
            "CIDR[,CIDR...] of reverse proxies whose X-Forwarded-For or Forwarded header names the client.",
            trusted_proxies,
        ],
        # -- connections
        [
            "header-timeout",
            None,
            30.0,
            "Seconds a client has to send a request's headers, from its first byte [default: 30].",
            Number("header-timeout", float),
        ],
        [
            "idle-timeout",
            None,
            60.0,
            "Seconds a keep-alive connection may wait for its next request [default: 60].",
            Number("idle-timeout", float),
        ],
        [
            "body-min-rate",
            None,
            500.0,
            "Bytes per second a request body must average, after --header-timeout seconds [default: 500].",
            Number("body-min-rate", float),
        ],
        [
            "backlog",
            None,
            None,
            "Listen backlog of every listener [default: the system's, net.core.somaxconn].",
            Number("backlog", int),
        ],
        [
            "max-connections",
            None,
            None,
            "Connections each listener holds at once; more are closed at once [default: from the "
            "open files limit].",
            Number("max-connections", int),
        ],
    ]
    optFlags = [
        ["clientauth", None, "Require client certificates on the user interface (HTTPS)."],
        ["debug", None, "Log the handlers' stdout and stderr."],
        [
            "keep-running-on-disconnect",
            None,
            "Leave handlers running when their client hangs up (routes may override).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["limits"] = {}
        #: the command line as given, which workers get too
        self.argv: list[str] = []
        for name, doc in self.docs.items():
            if "[default:" in doc:
                self.defaults.pop(name, None)  # (used for the help only)

    def opt_limit(self, value: str) -> None:
        """A resource limit of every handler, NAME=VALUE (memory, cpu, open_files, file_size, processes; sizes take K, M, G), repeatable; a route's own value wins."""
        try:
            name, number = parse_limit(value)
        except InvalidLimit as e:
            raise usage.UsageError(str(e)) from None
        self["limits"][name] = number

    def opt_spawn(self, value: str) -> None:
        """How handlers are started: fast (through the C library, off the reactor's thread, exits seen through pidfds) or reactor (Twisted's own processes) [default: fast where this system has it]."""
        if value not in SPAWN_KINDS:
            raise usage.UsageError(f"--spawn must be fast or reactor, not {value!r}")
        why = FastProcesses.unavailable() if value == "fast" else None
        if why is not None:
            raise usage.UsageError(f"--spawn fast: not on this system: {why}")
        self["spawn"] = value

    def opt_version(self) -> None:
        """Print the version and exit."""
        from kapow import __version__

        sys.stdout.write(f"kapow {__version__}\n")
        raise SystemExit(0)

    opt_h = usage.Options.opt_help  # -h, as the reference has it

    def getSynopsis(self) -> str:
        """
        The usage line: of ``kapow server``, or under a Twisted runner
        (``twist``, ``twistd``) of the runner and the plugin.
        """
        if self.parent is None:
            return f"Usage: kapow server {self.synopsis}"
        return f"Usage: {self._runner()} [options] {self.parent.subCommand} {self.synopsis}"

    def getUsage(self, width: int | None = None) -> str:
        shown = self.longOpt
        self.longOpt = [name for name in shown if name != WORKER_OPTION[2:] + "="]
        try:
            return super().getUsage(width)
        finally:
            self.longOpt = shown

    def parseOptions(self, options: list[str] | None = None) -> None:
        self.argv = list(sys.argv[1:] if options is None else options)
        ordered, booleans = self._in_getopt_order(self.argv)
        self.update(booleans)
        super().parseOptions(ordered)

    def _in_getopt_order(self, argv: list[str]) -> tuple[list[str], dict[str, int]]:
        """
        Split ``argv`` into what Twisted's getopt reads, the options and then
        ``--`` and the init programs, and the values of the boolean options,
        which getopt cannot read; only known options pass, with their names
        spelled out.
        """
        flags = {name for name, *_ in self.optFlags}
        options: list[str] = []
        programs: list[str] = []
        booleans: dict[str, int] = {}
        words = argv[::-1]  # the next word is words[-1]
        while words:
            word = words.pop()
            if word == "--":
                programs += reversed(words)
                break
            if word == "-" or not word.startswith("-"):
                programs.append(word)
            elif not word.startswith("--"):
                options.append(word)  # getopt knows -h and refuses any other
            else:
                name, given, value = word[2:].partition("=")
                if name in flags:
                    booleans[name] = self._boolean(name, value if given else None, words)
                else:
                    options.append(self._known(name, word, words))
        return [*options, "--", *programs], booleans

    @staticmethod
    def _boolean(name: str, value: str | None, words: list[str]) -> int:
        """``--name=VALUE``, ``--name true``, ``--name false``, or ``--name`` alone: true."""
        if value is None and words and words[-1] in _LONE_VALUES:
            value = words.pop()
        return 1 if value is None else boolean(name, value)

    def _known(self, name: str, word: str, words: list[str]) -> str:
        """
        Option ``--name`` in one word for getopt: with its value, the next
        word unless given, if it takes one.
        """
        if name + "=" in self.longOpt:
            if "=" in word:
                return word
            if not words:
                raise usage.UsageError(f"option --{name} requires argument")
            return f"{word}={words.pop()}"
        if name in self.longOpt:
            return word
        raise usage.UsageError(self._unrecognized(name, word, words))

    def _unrecognized(self, name: str, word: str, words: list[str]) -> str:
        """
        Why ``--name`` is refused: unknown, or an option of the Twisted runner
        (``twist --log-format``) given after the plugin's name.
        """
        runner = self.parent
        if runner is None or not {name, name + "="} & set(runner.longOpt):
            return f"option --{name} not recognized"
        if name + "=" in runner.longOpt and "=" not in word and words:
            word = f"{word}={words[-1]}"
        program = self._runner()
        return (
            f"option --{name} is {program}'s own: put it before the plugin name "
            f"({program} {word} {runner.subCommand} ...)"
        )

    def _runner(self) -> str:
        """The name of the Twisted runner whose plugin these options are, from its usage line."""
        assert self.parent is not None
        return self.parent.getSynopsis().split()[1]

    def parseArgs(self, *programs: str) -> None:
        self["init_programs"] = list(programs)

    def postOptions(self) -> None:
        if self["server-name"] is None:
            self["server-name"] = socket.gethostname()
        if bool(self["certfile"]) != bool(self["keyfile"]):
            raise usage.UsageError("--certfile and --keyfile go together")
        if self["clientauth"] and not self["certfile"]:
            raise usage.UsageError("--clientauth needs HTTPS: give --certfile and --keyfile")
        if self["clientcafile"] and not self["clientauth"]:
            raise usage.UsageError("--clientcafile needs --clientauth")
        if self["workers"] != 1 and self["data-bind"].startswith("haproxy:"):
            # its connections are handed to the workers as they come, PROXY header and all
            raise usage.UsageError("--data-bind haproxy: needs --workers 1")
        if self["limits"] and LimitedCommand.find(native_client()) is None:
            raise usage.UsageError("--limit needs the native kapow client or prlimit(1); neither is here")
