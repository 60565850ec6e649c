"""
The text log of ``kapow server``: the lines of Twisted's
:func:`~twisted.logger.textFileLogObserver`, made cheaply enough for one
access-log line per request.

Formatting an event the classic way costs more than the rest of a request's
bookkeeping: a time zone lookup and ``strftime`` per line, and a pass of
:class:`string.Formatter` over the format. Here the timestamp is formatted
once per second, and a line logged as ``"{line}"`` (the access log) is used
as it is. Every other event goes through Twisted's own formatting.
"""

from __future__ import annotations

from typing import IO, Any

from twisted.logger import FileLogObserver, LogEvent, formatEventAsClassicLogText, formatTime


def text_log_observer(out: IO[Any]) -> FileLogObserver:
    """A :class:`~twisted.logger.FileLogObserver` writing classic text lines to ``out``."""
    last: list[Any] = [None, "-"]  # the second last formatted, and its text

    def format_time(when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != last[0]:
            last[0], last[1] = second, formatTime(second)
        return last[1]

    def format_event(event: LogEvent) -> str | None:
        line = event.get("line")
        if (
            event.get("log_format") == "{line}"
            and type(line) is str
            and "\n" not in line
            and "log_failure" not in event
            and event.get("log_system") is None
        ):
            level = event.get("log_level")
            system = "{}#{}".format(event.get("log_namespace", "-"), level.name if level else "-")
            return f"{format_time(event.get('log_time'))} [{system}] {line}\n"
        return formatEventAsClassicLogText(event, formatTime=format_time)

    return FileLogObserver(out, format_event)
