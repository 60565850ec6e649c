"""The route table and gorilla/mux-style URL pattern matching.

A route binds an HTTP method and a URL pattern to a program to run. Patterns
follow gorilla/mux, as the reference Kapow! uses them:

- literal text matches itself;
- ``{name}`` matches one path segment (``[^/]+``);
- ``{name:regex}`` matches ``regex`` (Python :mod:`re` syntax), which may
  cross ``/``, e.g. ``{path:.*}``;
- the pattern matches the *whole* path: ``/foo`` does not match ``/foo/`` and a
  trailing slash in the pattern is required in the path.

Matching is done against the path exactly as the caller gives it (the user
interface passes the percent-decoded path, like gorilla/mux), and captured
values are returned as they appear in that string.

A route's ``mode`` (SPEC section 11) says how a matching request is
served: ``"http"`` (the default: one response), ``"websocket"`` (the
process's stdin and stdout are a WebSocket connection) or ``"events"`` (its
stdout is a Server-Sent Events stream). :class:`Route` checks the fields of
each mode; the server asks it :attr:`Route.mode_name`,
:attr:`Route.messages_kind`, :attr:`Route.effective_max_message`,
:attr:`Route.effective_ping`, :attr:`Route.effective_heartbeat` and
:meth:`Route.allows_origin`.

A route's ``rate`` and ``cors`` (SPEC section 13) are checked and given
their defaults by :mod:`kapow.core.traffic`; the server keeps a
:class:`~kapow.core.traffic.RateLimiter` per rated route and asks
:attr:`Route.cors_policy` for the CORS answers.

This module is pure Python and holds no global mutable state.
"""

from __future__ import annotations

import enum
import math
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from kapow.core.auth import AuthError, RouteAuth, normalize
from kapow.core.messages import quoted
from kapow.core.traffic import CorsPolicy, TrafficError, normalize_rate, origin_key

__all__ = [
    "DEFAULT_ENTRYPOINT",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_MAX_MESSAGE",
    "DEFAULT_PING",
    "MESSAGE_KINDS",
    "METHOD_NOT_ALLOWED",
    "MODES",
    "OPTIONS",
    "STREAMING_MODES",
    "STREAMING_REFUSES",
    "InvalidRoute",
    "Match",
    "Pattern",
    "Route",
    "RouteTable",
    "compile_pattern",
    "origin_key",
    "quoted",
    "route_from_json",
]

DEFAULT_ENTRYPOINT = "/bin/sh -c"

# RFC 9110 section 5.6.2: token = 1*tchar
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_DEFAULT_PLACEHOLDER = "[^/]+"

#: The optional fields of a route, shown by :meth:`Route.to_json` when set.
OPTIONS = (
    "timeout",
    "max_concurrency",
    "keep_running_on_disconnect",
    "stdin",
    "buffer",
    "error_status",
    "queue",
    "queue_timeout",
    "limits",
    "auth",
    "rate",
    "cors",
    "mode",
    "origins",
    "messages",
    "max_message",
    "ping",
    "heartbeat",
    "job",
)

#: Seconds a queued request waits for a slot when its route sets no ``queue_timeout``.
DEFAULT_QUEUE_TIMEOUT = 30.0

#: The longest queue a route may have: a longer one is taken for a mistake.
MAX_QUEUE = 1_000_000

#: The values of a route's ``mode``; ``None`` (absent) means ``"http"``.
MODES = ("http", "websocket", "events")

#: The modes in which a matching request gets a long-lived stream, not one response.
STREAMING_MODES = ("websocket", "events")

#: The fields a route of :data:`STREAMING_MODES` must not set (given as anything
#: but ``null``). ``job`` is checked by name, for when routes have it.
STREAMING_REFUSES = ("stdin", "buffer", "error_status", "job")

#: The fields only a ``"websocket"`` route may set.
_WEBSOCKET_ONLY = ("origins", "messages", "max_message", "ping")

#: The fields only an ``"events"`` route may set.
_EVENTS_ONLY = ("heartbeat",)

#: The values of a WebSocket route's ``messages``; ``None`` (absent) means ``"lines"``.
MESSAGE_KINDS = ("lines", "binary")

#: The largest WebSocket message, in bytes, when a route sets no ``max_message`` (1 MiB).
DEFAULT_MAX_MESSAGE = 1 << 20

#: Seconds between WebSocket pings when a route sets no ``ping`` (0 would mean never).
DEFAULT_PING = 30.0

#: Seconds between event-stream keep-alive comments when a route sets no
#: ``heartbeat`` (0 would mean never).
DEFAULT_HEARTBEAT = 15.0

#: The resource limits a route may set (:mod:`kapow.core.resource_limits` applies them).
LIMIT_NAMES = ("memory", "cpu", "open_files", "file_size", "processes")

#: The largest value of a limit: anything above is taken for a mistake (the
#: kernel's "unlimited" is 2**64 - 1).
MAX_LIMIT = 2**62


class InvalidRoute(ValueError):
    """A route or URL pattern is refused; the message says why, in one line.

    The control API answers every such refusal with ``Invalid Route``, and
    the message as its detail.
    """


class Pattern:
    """A compiled URL pattern, as made by :func:`compile_pattern`.

    :ivar url_pattern: the pattern text it was compiled from.
    :ivar names: the placeholder names, in order of appearance.
    """

    __slots__ = ("_groups", "_regex", "names", "url_pattern")

    def __init__(self, url_pattern: str, names: tuple[str, ...], regex: re.Pattern[str]) -> None:
        self.url_pattern = url_pattern
        self.names = names
        self._regex = regex
        self._groups = tuple((name, regex.groupindex[f"_kapow_{k}"]) for k, name in enumerate(names))

    def match(self, path: str) -> dict[str, str] | None:
        """Match the whole of ``path``.

        :param path: the request path, as the caller wants it compared.
        :return: placeholder name -> captured text (a fresh dict), or ``None``
            if the path does not match.
        """
        found = self._regex.fullmatch(path)
        if found is None:
            return None
        return {name: found.group(number) for name, number in self._groups}

    def __repr__(self) -> str:
        return f"<Pattern {self.url_pattern!r}>"


def _brace_spans(url_pattern: str) -> list[tuple[int, int]]:
    """Find the outermost ``{...}`` spans as ``(start, end)`` with ``end``
    just past the closing brace; nested braces belong to the placeholder's
    regex (``{id:[0-9]{3}}``).

    :raises InvalidRoute: if the braces are unbalanced.
    """
    spans = []
    level = 0
    start = 0
    for i, char in enumerate(url_pattern):
        if char == "{":
            level += 1
            if level == 1:
                start = i
        elif char == "}":
            level -= 1
            if level == 0:
                spans.append((start, i + 1))
            elif level < 0:
                raise InvalidRoute(f"unbalanced braces in url_pattern {quoted(url_pattern)}")
    if level != 0:
        raise InvalidRoute(f"unbalanced braces in url_pattern {quoted(url_pattern)}")
    return spans


def compile_pattern(url_pattern: str) -> Pattern:
    """Compile a gorilla/mux-style URL pattern.

    A placeholder's name is the text between ``{`` and its first ``:`` (or the
    closing ``}``), taken as written; any text is accepted, so ``{file-name}``
    is fine. Each placeholder's regex is matched as a unit, so groups it may
    contain never disturb which text is captured under which name. Regexes
    use Python :mod:`re` syntax; a flag must be scoped, ``(?i:abc)``, since a
    global ``(?i)`` inside a placeholder does not compile.

    :param url_pattern: the pattern; must start with ``/``.
    :return: the compiled :class:`Pattern`.
    :raises InvalidRoute: if the pattern is not a non-empty string starting
        with ``/``, its braces are unbalanced, a placeholder has an empty name
        or an empty regex, a name appears twice, or a regex does not compile.
    """
    if not isinstance(url_pattern, str):
        raise InvalidRoute(f"url_pattern must be a string, not {quoted(url_pattern)}")
    if not url_pattern:
        raise InvalidRoute("url_pattern is empty")
    if not url_pattern.startswith("/"):
        raise InvalidRoute(f"url_pattern {quoted(url_pattern)} does not start with '/'")
    parts = []
    names: list[str] = []
    end = 0
    for start, stop in _brace_spans(url_pattern):
        parts.append(re.escape(url_pattern[end:start]))
        end = stop
        placeholder = url_pattern[start:stop]
        name, colon, regex = placeholder[1:-1].partition(":")
        if not colon:
            regex = _DEFAULT_PLACEHOLDER
        if not name:
            raise InvalidRoute(f"placeholder {quoted(placeholder)} has no name")
        if not regex:
            raise InvalidRoute(f"placeholder {quoted(placeholder)} has an empty regex")
        if name in names:
            raise InvalidRoute(
                f"placeholder name {quoted(name)} appears twice in url_pattern {quoted(url_pattern)}"
            )
        try:
            re.compile(regex)
        except re.error as e:
            raise InvalidRoute(
                f"regex {quoted(regex)} of placeholder {quoted(name)} does not compile: {e}"
            ) from None
        # Captures are read by the generated group name, so groups inside
        # the user's regex never shift which text goes under which name.
        parts.append(f"(?P<_kapow_{len(names)}>{regex})")
        names.append(name)
    parts.append(re.escape(url_pattern[end:]))
    try:
        compiled = re.compile("".join(parts))
    except re.error as e:
        # e.g. a user regex reusing a generated group name or a backreference
        # to a group outside itself; a position would be in the generated regex.
        raise InvalidRoute(
            f"the placeholder regexes of url_pattern {quoted(url_pattern)} do not compile together: {e.msg}"
        ) from None
    return Pattern(url_pattern, tuple(names), compiled)


def _check_positive_number(value: object, name: str = "timeout", zero: bool = False) -> None:
    """``value`` checked: a finite number of seconds > 0 (>= 0 if ``zero``), not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRoute(f"{name} must be a number of seconds, not {quoted(value)}")
    try:
        as_float = float(value)
    except OverflowError:
        raise InvalidRoute(f"{name} is too large: {quoted(value)}") from None
    if not math.isfinite(as_float) or as_float < 0 or (as_float == 0 and not zero):
        raise InvalidRoute(
            f"{name} must be a finite number of seconds {'>=' if zero else '>'} 0, not {quoted(value)}"
        )


def _checked_origins(origins: object) -> tuple[str, ...]:
    """``origins`` checked: a list of strings, each ``"*"`` or an origin URL (:func:`origin_key`)."""
    if isinstance(origins, (str, bytes, Mapping)) or not isinstance(origins, Iterable):
        raise InvalidRoute(f"origins must be a list of strings, not {quoted(origins)}")
    checked = tuple(origins)
    for origin in checked:
        if not isinstance(origin, str):
            raise InvalidRoute(f"origins must be a list of strings, and {quoted(origin)} is not one")
        if origin != "*" and origin_key(origin) is None:
            raise InvalidRoute(
                f"origin {quoted(origin)} is not '*' or an http, https, ws or wss URL of a host "
                "(scheme://host[:port], no path, query or fragment)"
            )
    return checked


def _checked_limits(limits: object) -> dict[str, int]:
    """``limits`` checked: some of :data:`LIMIT_NAMES`, each a whole number from 1 to :data:`MAX_LIMIT`."""
    if not isinstance(limits, Mapping):
        raise InvalidRoute(f"limits must be a JSON object, not {quoted(limits)}")
    for name in limits:
        if name not in LIMIT_NAMES:
            raise InvalidRoute(f"unknown limit {quoted(name)} (known: {', '.join(LIMIT_NAMES)})")
    checked = {}
    for name in LIMIT_NAMES:
        if name in limits:
            value = limits[name]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
                raise InvalidRoute(
                    f"limit {name} must be a whole number from 1 to {MAX_LIMIT}, not {quoted(value)}"
                )
            checked[name] = value
    return checked


@dataclass(frozen=True)
class Route:
    """One route: which requests it matches and what it runs.

    Creating a Route validates it, so a Route that exists is always usable.
    ``method`` is upper-cased: HTTP methods are case-sensitive, but operators
    type ``get`` and mean ``GET`` (gorilla/mux upper-cases them the same way).

    :ivar id: unique id, made by the server.
    :ivar method: the HTTP method matched, exactly (an RFC 9110 token).
    :ivar url_pattern: the gorilla/mux-style pattern (see the module docs).
    :ivar entrypoint: the program and leading arguments, split like a POSIX
        shell splits words (no shell involved).
    :ivar command: appended to the entrypoint's words as one last argument,
        unless empty.
    :ivar timeout: seconds a handler may run (> 0), or ``None`` for no limit.
    :ivar max_concurrency: how many handlers of this route may run at once
        (>= 1), or ``None`` for no limit.
    :ivar keep_running_on_disconnect: whether handlers go on running when
        their client hangs up (``None``: the server's default).
    :ivar stdin: ``"body"``: the handler's stdin is the request body;
        ``None``: it is empty.
    :ivar buffer: hold the response until the process exits and send it
        with ``Content-Length`` (``None`` or ``False``: it streams).
    :ivar error_status: the status (400-599) a handler that fails gets when
        it set none of its own >= 400 and its response has not started.
    :ivar queue: with ``max_concurrency``, how many requests may wait for
        a free slot, first come first served, instead of getting 503
        (``None``: none).
    :ivar queue_timeout: seconds a request may wait in that queue (> 0;
        ``None``: :data:`DEFAULT_QUEUE_TIMEOUT`).
    :ivar limits: resource limits of the handler and everything it starts
        (:mod:`kapow.core.resource_limits`); ``None`` or empty: the server's.
    :ivar auth: the request authentication (see :mod:`kapow.core.auth`): its
        files are read when the route is made.
    :ivar strict_auth: whether an auth file that cannot be read makes the
        route invalid (else the route refuses every request until a reload).
    :ivar mode: one of :data:`MODES`: ``"http"`` (one response, SPEC
        section 3), ``"websocket"`` or ``"events"`` (SPEC section 11);
        ``None``: ``"http"`` (not shown). A websocket or events route must
        have method ``GET`` and sets none of :data:`STREAMING_REFUSES`.
        :attr:`mode_name` is the mode with the default applied.
    :ivar origins: websocket only: the origins, besides the request's own,
        whose upgrades are accepted; each ``"*"`` (any) or an absolute
        http, https, ws or wss URL of a host (``https://a.example``,
        ``http://b.example:8080/``). A tuple here, a JSON list in
        :meth:`to_json`; ``None`` (or empty): only the request's own origin.
        :meth:`allows_origin` checks an ``Origin`` against it.
    :ivar messages: websocket only: one of :data:`MESSAGE_KINDS`
        (``None``: ``"lines"``; see :attr:`messages_kind`).
    :ivar max_message: websocket only: the largest message in bytes, an
        integer >= 1 (``None``: :data:`DEFAULT_MAX_MESSAGE`; see
        :attr:`effective_max_message`).
    :ivar ping: websocket only: seconds between pings, a number >= 0, 0 for
        never (``None``: :data:`DEFAULT_PING`; see :attr:`effective_ping`).
    :ivar heartbeat: events only: seconds between keep-alive comments, a
        number >= 0, 0 for never (``None``: :data:`DEFAULT_HEARTBEAT`; see
        :attr:`effective_heartbeat`).
    :ivar job: answer 202 at once and keep the response as the result of a
        job (SPEC section 12); not with a streaming mode.
    :ivar rate: the route's rate limit (SPEC section 13), as
        :func:`kapow.core.traffic.normalize_rate` gives it: ``requests``,
        ``per``, ``burst`` (default ``requests``), ``key`` (default
        ``"client"``). The buckets are the server's
        (:class:`kapow.core.traffic.RateLimiter`).
    :ivar cors: the route's cross-origin policy (SPEC section 13), as
        :func:`kapow.core.traffic.normalize_cors` gives it: ``origins``,
        ``headers`` (default empty), ``max_age`` (default 600),
        ``credentials`` (default false); :attr:`cors_policy` decides.
    :raises InvalidRoute: if a field is invalid.
    """

    id: str
    method: str
    url_pattern: str
    entrypoint: str = DEFAULT_ENTRYPOINT
    command: str = ""
    timeout: float | None = None
    max_concurrency: int | None = None
    keep_running_on_disconnect: bool | None = None
    stdin: str | None = None
    buffer: bool | None = None
    error_status: int | None = None
    queue: int | None = None
    queue_timeout: float | None = None
    limits: Mapping[str, int] | None = field(default=None, hash=False)
    auth: Mapping[str, object] | None = field(default=None, hash=False)
    strict_auth: bool = field(default=True, repr=False, compare=False)
    mode: str | None = None
    origins: tuple[str, ...] | None = None
    messages: str | None = None
    max_message: int | None = None
    ping: float | None = None
    heartbeat: float | None = None
    job: bool | None = None
    rate: Mapping[str, object] | None = field(default=None, hash=False)
    cors: Mapping[str, object] | None = field(default=None, hash=False)
    _pattern: Pattern = field(init=False, repr=False, compare=False)
    _argv: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _guard: RouteAuth | None = field(init=False, repr=False, compare=False, default=None)
    _origin_keys: frozenset[tuple[str, str, int]] | None = field(
        init=False, repr=False, compare=False, default=None
    )
    _cors_policy: CorsPolicy | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str):
            raise InvalidRoute("id must be a string")
        if not isinstance(self.method, str):
            raise InvalidRoute(f"method must be a string, not {quoted(self.method)}")
        if not self.method:
            raise InvalidRoute("method is empty")
        if not _TOKEN.fullmatch(self.method):
            raise InvalidRoute(f"method {quoted(self.method)} is not an HTTP token (no spaces or separators)")
        object.__setattr__(self, "method", self.method.upper())
        object.__setattr__(self, "_pattern", compile_pattern(self.url_pattern))
        for name in ("entrypoint", "command"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidRoute(f"{name} must be a string, not {quoted(value)}")
            # No program can receive an argument with a NUL byte in it.
            if "\0" in value:
                raise InvalidRoute(f"{name} contains a NUL character")
        try:
            words = shlex.split(self.entrypoint)
        except ValueError as e:
            raise InvalidRoute(
                f"entrypoint {quoted(self.entrypoint)} cannot be split into words: {e}"
            ) from None
        object.__setattr__(self, "_argv", (*words, self.command) if self.command else tuple(words))
        if self.timeout is not None:
            _check_positive_number(self.timeout)
        if self.max_concurrency is not None and (
            isinstance(self.max_concurrency, bool)
            or not isinstance(self.max_concurrency, int)
            or self.max_concurrency < 1
        ):
            raise InvalidRoute(f"max_concurrency must be an integer >= 1, not {quoted(self.max_concurrency)}")
        if self.keep_running_on_disconnect is not None and not isinstance(
            self.keep_running_on_disconnect, bool
        ):
            raise InvalidRoute(
                f"keep_running_on_disconnect must be true or false, not {quoted(self.keep_running_on_disconnect)}"
            )
        if self.stdin is not None and self.stdin != "body":
            raise InvalidRoute(f'stdin must be "body", not {quoted(self.stdin)}')
        if self.buffer is not None and not isinstance(self.buffer, bool):
            raise InvalidRoute(f"buffer must be true or false, not {quoted(self.buffer)}")
        if self.error_status is not None and (
            isinstance(self.error_status, bool)
            or not isinstance(self.error_status, int)
            or not 400 <= self.error_status <= 599
        ):
            raise InvalidRoute(
                f"error_status must be an integer from 400 to 599, not {quoted(self.error_status)}"
            )
        if self.queue is not None and (
            isinstance(self.queue, bool)
            or not isinstance(self.queue, int)
            or not 0 <= self.queue <= MAX_QUEUE
        ):
            raise InvalidRoute(f"queue must be an integer from 0 to {MAX_QUEUE}, not {quoted(self.queue)}")
        if self.queue_timeout is not None:
            _check_positive_number(self.queue_timeout, "queue_timeout")
        if self.limits is not None:
            object.__setattr__(self, "limits", _checked_limits(self.limits) or None)
        self._check_mode()
        if self.auth is not None:
            try:
                spec = normalize(self.auth)
                object.__setattr__(self, "auth", spec)
                object.__setattr__(self, "_guard", RouteAuth(spec, strict=self.strict_auth))
            except AuthError as e:
                raise InvalidRoute(f"auth: {e}") from None
        try:
            if self.rate is not None:
                object.__setattr__(self, "rate", normalize_rate(self.rate))
            if self.cors is not None:
                policy = CorsPolicy(self.cors)
                object.__setattr__(self, "cors", policy.spec)
                object.__setattr__(self, "_cors_policy", policy)
        except TrafficError as e:
            raise InvalidRoute(str(e)) from None

    def _check_mode(self) -> None:
        """Check :attr:`mode` and the fields that belong to one mode (:attr:`job` among them)."""
        if self.job is not None and not isinstance(self.job, bool):
            raise InvalidRoute(f"job must be true or false, not {quoted(self.job)}")
        if self.mode is not None and (not isinstance(self.mode, str) or self.mode not in MODES):
            raise InvalidRoute(f'mode must be "http", "websocket" or "events", not {quoted(self.mode)}')
        if self.origins is not None:
            object.__setattr__(self, "origins", _checked_origins(self.origins) or None)
        if self.messages is not None and (
            not isinstance(self.messages, str) or self.messages not in MESSAGE_KINDS
        ):
            raise InvalidRoute(f'messages must be "lines" or "binary", not {quoted(self.messages)}')
        if self.max_message is not None and (
            isinstance(self.max_message, bool)
            or not isinstance(self.max_message, int)
            or self.max_message < 1
        ):
            raise InvalidRoute(f"max_message must be an integer >= 1 (bytes), not {quoted(self.max_message)}")
        if self.ping is not None:
            _check_positive_number(self.ping, "ping", zero=True)
        if self.heartbeat is not None:
            _check_positive_number(self.heartbeat, "heartbeat", zero=True)
        mode = self.mode_name
        if mode in STREAMING_MODES:
            if self.method != "GET":
                raise InvalidRoute(f"mode {mode} needs method GET, not {self.method}")
            for name in STREAMING_REFUSES:
                if getattr(self, name, None) is not None:
                    raise InvalidRoute(f"mode {mode} takes no {name}")
        for names, needed in ((_WEBSOCKET_ONLY, "websocket"), (_EVENTS_ONLY, "events")):
            for name in names:
                if mode != needed and getattr(self, name) is not None:
                    raise InvalidRoute(f"{name} needs mode {needed}, not {mode}")
        if self.origins is not None and "*" not in self.origins:
            keys = frozenset(key for key in map(origin_key, self.origins) if key is not None)
            object.__setattr__(self, "_origin_keys", keys)

    @property
    def mode_name(self) -> str:
        """:attr:`mode`, ``"http"`` when absent: one of :data:`MODES`."""
        return self.mode or "http"

    @property
    def messages_kind(self) -> str:
        """:attr:`messages`, ``"lines"`` when absent: one of :data:`MESSAGE_KINDS`."""
        return self.messages or "lines"

    @property
    def effective_max_message(self) -> int:
        """:attr:`max_message`, :data:`DEFAULT_MAX_MESSAGE` when absent."""
        return DEFAULT_MAX_MESSAGE if self.max_message is None else self.max_message

    @property
    def effective_ping(self) -> float:
        """:attr:`ping` in seconds, :data:`DEFAULT_PING` when absent; 0 means never."""
        return DEFAULT_PING if self.ping is None else float(self.ping)

    @property
    def effective_heartbeat(self) -> float:
        """:attr:`heartbeat` in seconds, :data:`DEFAULT_HEARTBEAT` when absent; 0 means never."""
        return DEFAULT_HEARTBEAT if self.heartbeat is None else float(self.heartbeat)

    def allows_origin(self, origin: str) -> bool:
        """Whether :attr:`origins` lists ``origin`` (an ``Origin`` header's value).

        ``"*"`` in :attr:`origins` allows any value (even ``null`` or a
        malformed one); otherwise scheme and host compare without regard
        to case and an absent port is the scheme's default, so
        ``https://A.example:443`` lists ``https://a.example``. Whether the
        origin is the request's own (scheme + ``Host``), which is always
        allowed, is the caller's to check.
        """
        if self.origins is None:
            return False
        if self._origin_keys is None:  # "*" is listed
            return True
        key = origin_key(origin)
        return key is not None and key in self._origin_keys

    @property
    def cors_policy(self) -> CorsPolicy | None:
        """The CORS decisions of :attr:`cors`, if the route has it (see :mod:`kapow.core.traffic`)."""
        return self._cors_policy

    @property
    def guard(self) -> RouteAuth | None:
        """The loaded :attr:`auth` checks, if the route has any."""
        return self._guard

    @property
    def pattern(self) -> Pattern:
        """The compiled :attr:`url_pattern`."""
        return self._pattern

    def argv(self) -> list[str]:
        """The argument vector to execute: the entrypoint's words, then the
        command as one argument if it is not empty.

        An empty entrypoint gives no program (only the command, or nothing);
        running it is refused by whoever spawns it.
        """
        return list(self._argv)

    def to_json(self, index: int) -> dict[str, object]:
        """The route as the control API shows it.

        :param index: the route's current position in its table.
        :return: ``id``, ``method``, ``url_pattern``, ``entrypoint``,
            ``command`` and ``index``, plus each of :data:`OPTIONS` that
            is set.
        """
        data: dict[str, object] = {
            "id": self.id,
            "method": self.method,
            "url_pattern": self.url_pattern,
            "entrypoint": self.entrypoint,
            "command": self.command,
            "index": index,
        }
        for name in OPTIONS:
            value = getattr(self, name)
            if value is not None:
                data[name] = _plain(value)
        return data


def _plain(value: object) -> object:
    """``value`` copied as JSON values: mappings as dicts, tuples and lists as lists."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def route_from_json(data: object, route_id: str, strict_auth: bool = True) -> Route:
    """Build a route from a decoded JSON request body.

    Required: ``method`` (non-empty string, an HTTP token; upper-cased) and
    ``url_pattern`` (string starting with ``/``, a valid pattern). Optional,
    where ``null`` counts as absent: ``entrypoint`` (string, default
    ``/bin/sh -c``; an empty string is kept as given), ``command`` (string,
    default empty), ``timeout`` (number of seconds > 0; ``true``/``false``
    are not numbers), ``max_concurrency`` (integer >= 1; ``2.0`` is refused),
    ``keep_running_on_disconnect`` (``true`` or ``false``), ``stdin``
    (``"body"``), ``buffer`` (``true`` or ``false``), ``error_status``
    (integer from 400 to 599), ``queue`` (integer from 0 to
    :data:`MAX_QUEUE`), ``queue_timeout`` (seconds > 0), ``limits`` (an
    object: some of :data:`LIMIT_NAMES`, each a whole number from 1 to
    :data:`MAX_LIMIT`), ``auth`` (see :mod:`kapow.core.auth`), ``mode``
    (one of :data:`MODES`), ``origins`` (a list of ``"*"`` or origin URLs),
    ``messages`` (one of :data:`MESSAGE_KINDS`), ``max_message`` (integer
    >= 1), ``ping`` and ``heartbeat`` (seconds >= 0); see :class:`Route`
    for which mode takes which; ``rate`` and ``cors`` (see
    :mod:`kapow.core.traffic`). Any other key, including ``id`` and
    ``index``, is ignored.

    :param data: what :func:`json.loads` returned.
    :param route_id: the id the new route gets.
    :param strict_auth: see :attr:`Route.strict_auth`.
    :raises InvalidRoute: if ``data`` is not an object or any field is invalid.
    """
    if not isinstance(data, dict):
        raise InvalidRoute(f"a route must be a JSON object, not {quoted(data)}")
    for key in ("method", "url_pattern"):
        if data.get(key) is None:
            raise InvalidRoute(f"{key} is missing")
    optional = {key: data.get(key) for key in ("entrypoint", "command", *OPTIONS)}
    return Route(
        id=route_id,
        method=data["method"],
        url_pattern=data["url_pattern"],
        strict_auth=strict_auth,
        **{key: value for key, value in optional.items() if value is not None},
    )


@dataclass(frozen=True)
class Match:
    """A route that matched a request.

    :ivar route: the route, as it was when it matched.
    :ivar matches: placeholder name -> captured text.
    """

    route: Route
    matches: dict[str, str]


class _MethodNotAllowed(enum.Enum):
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"

    def __repr__(self) -> str:
        return "METHOD_NOT_ALLOWED"


#: Returned by :meth:`RouteTable.match` when the path matches some route but
#: no route for the request's method: the request gets 405, not 404.
METHOD_NOT_ALLOWED = _MethodNotAllowed.METHOD_NOT_ALLOWED


class RouteTable:
    """Routes in order, each with a unique id.

    Each change replaces the internal tuple (copy-on-write), so a caller
    holding a :class:`Route` or a :meth:`snapshot` keeps it unchanged.
    Indexes are always dense: ``0`` to ``len(table) - 1``.

    :param routes: the initial routes, in order.
    :raises InvalidRoute: if two of ``routes`` share an id.
    """

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes: tuple[Route, ...] = ()
        for route in routes:
            self.append(route)

    def snapshot(self) -> tuple[Route, ...]:
        """The routes, in order, as they are now."""
        return self._routes

    def __len__(self) -> int:
        return len(self._routes)

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    def _check_new(self, route: Route) -> None:
        if not isinstance(route, Route):
            raise TypeError(f"not a Route: {route!r}")
        if any(existing.id == route.id for existing in self._routes):
            raise InvalidRoute(f"a route with id {route.id!r} already exists")

    def append(self, route: Route) -> int:
        """Add ``route`` after every other route.

        :return: the index it got.
        :raises InvalidRoute: if a route with the same id is already present.
        """
        return self.insert(route, len(self._routes))

    def insert(self, route: Route, index: int) -> int:
        """Add ``route`` at ``index``, moving the routes from there on one up.

        :param index: wanted position; past the end means at the end.
        :return: the index it got.
        :raises InvalidRoute: if ``index`` is negative or not an integer, or a
            route with the same id is already present.
        """
        if isinstance(index, bool) or not isinstance(index, int):
            raise InvalidRoute("index must be an integer")
        if index < 0:
            raise InvalidRoute("index must not be negative")
        self._check_new(route)
        index = min(index, len(self._routes))
        routes = self._routes
        self._routes = (*routes[:index], route, *routes[index:])
        return index

    def replace(self, routes: Iterable[Route]) -> None:
        """Make ``routes`` the whole table, in their order.

        :raises InvalidRoute: if two of ``routes`` share an id; the table is
            unchanged then.
        """
        table = RouteTable(routes)
        self._routes = table._routes

    def remove(self, route_id: str) -> Route:
        """Remove the route with id ``route_id``.

        :return: the removed route.
        :raises KeyError: if there is no such route.
        """
        index, route = self.get(route_id)
        routes = self._routes
        self._routes = routes[:index] + routes[index + 1 :]
        return route

    def find(self, route_id: str) -> Route | None:
        """The route with id ``route_id``, or ``None``."""
        for route in self._routes:
            if route.id == route_id:
                return route
        return None

    def get(self, route_id: str) -> tuple[int, Route]:
        """Find the route with id ``route_id``.

        :return: its index and the route.
        :raises KeyError: if there is no such route.
        """
        for index, route in enumerate(self._routes):
            if route.id == route_id:
                return index, route
        raise KeyError(route_id)

    def listing(self) -> list[dict[str, object]]:
        """Every route as :meth:`Route.to_json` shows it, in table order."""
        return [route.to_json(index) for index, route in enumerate(self._routes)]

    def methods_for(self, path: str) -> list[str]:
        """The methods of the routes whose pattern matches ``path``, sorted."""
        return sorted({route.method for route in self._routes if route.pattern.match(path) is not None})

    def match(self, method: str, path: str) -> Match | Literal[_MethodNotAllowed.METHOD_NOT_ALLOWED] | None:
        """Find the route for a request.

        Routes are tried in table order; the first whose method equals
        ``method`` exactly and whose pattern matches the whole ``path`` wins.

        :param method: the request's method, as sent.
        :param path: the request's path (percent-decoded by the caller).
        :return: the :class:`Match`; else :data:`METHOD_NOT_ALLOWED` if the
            path matches some route with another method; else ``None``.
        """
        routes = self._routes
        others = []
        for route in routes:
            if route.method != method:
                others.append(route)
                continue
            matches = route.pattern.match(path)
            if matches is not None:
                return Match(route, matches)
        if any(route.pattern.match(path) is not None for route in others):
            return METHOD_NOT_ALLOWED
        return None
