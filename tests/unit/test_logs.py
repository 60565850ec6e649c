"""The text log of ``kapow server``: the same lines as Twisted's text observer."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

from twisted.logger import LogLevel, textFileLogObserver
from twisted.python.failure import Failure

from kapow.server.logs import text_log_observer


def text(observer_factory: Callable, events: list[dict]) -> str:
    out = io.StringIO()
    observer = observer_factory(out)
    for event in events:
        observer(dict(event))
    return out.getvalue()


def event(level: LogLevel, format: str, when: float | None, **fields: object) -> dict:
    return {
        "log_level": level, "log_format": format, "log_time": when,
        "log_namespace": "kapow.test", **fields,
    }  # fmt: skip


def test_same_text_as_twisted() -> None:
    now = time.time()
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        failure = Failure()
    events = [
        event(LogLevel.info, "{line}", now, line='127.0.0.1 - - [x] "GET / HTTP/1.1" 200 5'),
        event(LogLevel.info, "{line}", now + 1.5, line="two\nlines"),
        event(LogLevel.warn, "handler {id} exited with status {status}", now + 2, id="abc", status=3),
        event(LogLevel.info, "{line}", now, line="from the old API", log_system="-"),
        event(LogLevel.error, "{line}", None, line=12),
        event(LogLevel.critical, "{line}", now, line="broke", log_failure=failure),
        {"log_format": "{line}", "line": "no level, no namespace", "log_time": now},
    ]
    ours = text(text_log_observer, events)
    assert ours == text(textFileLogObserver, events)
    assert "ZeroDivisionError" in ours
    assert "[kapow.test#info] 127.0.0.1 - - [x]" in ours


def test_time_formatted_again_each_second() -> None:
    start = int(time.time())
    events = [event(LogLevel.info, "{line}", start + s, line="x") for s in (0.1, 0.9, 1.2, 3600.5, 3600.7)]
    ours = text(text_log_observer, events)
    assert ours == text(textFileLogObserver, events)
    assert len({line.split()[0] for line in ours.splitlines()}) == 3


def test_the_access_event_names_the_worker_that_served_the_request() -> None:
    from twisted.logger import globalLogPublisher
    from twisted.web.resource import Resource
    from twisted.web.server import Request
    from twisted.web.test.requesthelper import DummyChannel

    from kapow.user.site import UserSite

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for worker in (2, None):
            UserSite(Resource(), worker=worker).log(Request(DummyChannel()))
    finally:
        globalLogPublisher.removeObserver(events.append)
    access = [e for e in events if e.get("log_namespace") == "kapow.access"]
    assert [e["worker"] for e in access] == [2, None]
    assert all(e["log_format"] == "{line}" and '"(no method yet)' in e["line"] for e in access)


def test_the_access_line_spells_the_version_as_the_reference_does() -> None:
    from twisted.web.pages import notFound
    from twisted.web.server import Site
    from twisted.web.test.requesthelper import DummyChannel

    from kapow.user.site import UserRequest, access_line

    for received, spelled in ((b"HTTP/2", "HTTP/2.0"), (b"HTTP/1.1", "HTTP/1.1"), (b"HTTP/1.0", "HTTP/1.0")):
        channel = DummyChannel()
        channel.site = Site(notFound())
        request = UserRequest(channel)
        request.gotLength(0)
        request.requestReceived(b"GET", b"/x", received)  # HTTP/2 streams pass "HTTP/2"
        assert request.clientproto == spelled.encode()
        assert f'"GET /x {spelled}"' in access_line(request)
