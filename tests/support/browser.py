"""
A real browser for the tests: headless Chromium, driven over the DevTools
protocol on a pipe (``--remote-debugging-pipe``) with nothing but the
standard library.

Why not ``chromium --dump-dom``: it prints the DOM once the page has
loaded, or once ``--virtual-time-budget`` is spent, and virtual time does
not wait for real network events. A chat page's WebSocket opens, but its
messages come after the dump; an ``EventSource`` keeps the page loading, so
the dump never comes. Here a test loads a page, then polls a JavaScript
condition in real time until it holds (``Page.wait_for``), and reads the
DOM when it does: as quick as the page is, and with a deadline.

The protocol pipe: Chromium reads commands from its fd 3 and writes answers
and events to its fd 4, each a JSON text ended by a NUL byte. The child's
stdin and stdout pipes are moved there by ``sh`` before Chromium starts.
Each browser has its own profile directory, runs in its own process group,
and :meth:`Browser.close` ends that whole group.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM", "MISSING", "Browser", "Page", "find_chromium"]


def find_chromium() -> str | None:
    """The Chromium to run: ``$CHROMIUM`` if set, else ``chromium`` or ``chromium-browser`` on PATH."""
    given = os.environ.get("CHROMIUM")
    if given:
        return shutil.which(given)
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = find_chromium()
#: Why there is no :data:`CHROMIUM`, for a test's skip.
MISSING = (
    f"$CHROMIUM={os.environ['CHROMIUM']!r} is not a program"
    if os.environ.get("CHROMIUM")
    else "Chromium is not installed (apt-get install chromium), or set $CHROMIUM to its path"
)

FLAGS = (
    "--headless=new",
    "--no-sandbox",  # as root, and in containers without user namespaces
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",  # 127.0.0.1 directly, whatever the environment says
    "--password-store=basic",
    "--remote-debugging-pipe",
)

# fd 3 and 4 of the browser are this process's pipes to its stdin and stdout.
_SHELL = 'exec "$0" "$@" 3<&0 4>&1 </dev/null >&2'


class Browser:
    """
    A headless Chromium with its profile in ``profile`` (created) and its
    output in ``profile``/../chromium.log. Use as a context manager, or call
    :meth:`close`.
    """

    def __init__(self, profile: Path, binary: str | None = None, timeout: float = 15.0) -> None:
        binary = binary or CHROMIUM
        if binary is None:
            raise RuntimeError("no Chromium found (apt-get install chromium)")
        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile.parent / "chromium.log"
        self.timeout = timeout
        self._next_id = 0
        self._buffer = b""
        self._events: list[dict[str, Any]] = []
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["/bin/sh", "-c", _SHELL, binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        try:
            self.version = self.call("Browser.getVersion")["product"]
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the protocol ----------------------------------------------------------

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        """Send one command and return its result; an error answer raises ``RuntimeError``."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\0")
        self.process.stdin.flush()
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._receive(deadline, method)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            if "method" in answer:
                self._events.append(answer)

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer {waiting_for}:\n{self.output()}")
            data = os.read(fd, 1 << 20)
            if not data:
                raise ConnectionError(f"Chromium exited:\n{self.output()}")
            self._buffer += data
        text, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(text)

    def events(self, session: str) -> list[dict[str, Any]]:
        """The events received so far for ``session``, oldest first."""
        return [e for e in self._events if e.get("sessionId") == session]

    def output(self) -> str:
        """The end of what Chromium wrote to its stderr."""
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- pages -----------------------------------------------------------------

    def open(self, url: str) -> Page:
        """A new tab, with its console and errors recorded, navigated to ``url``."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=session)
        navigated = self.call("Page.navigate", {"url": url}, session=session)
        if navigated.get("errorText"):
            raise AssertionError(f"cannot load {url}: {navigated['errorText']}")
        return page

    def close(self) -> None:
        """Close the browser and end its process group, whatever is left of it."""
        process = self.process
        if process.returncode is None:
            if not _exited(process.pid):
                try:
                    self.call("Browser.close")
                except (OSError, RuntimeError, TimeoutError, ConnectionError):
                    pass
                _wait_exit(process.pid, 5.0)
            # not reaped yet, so the group is still this one: end what it left behind
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        process.wait()


def _exited(pid: int) -> bool:
    """Whether ``pid`` (a child) has exited, without reaping it."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None


def _wait_exit(pid: int, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``pid`` (a child) to exit, without reaping it."""
    deadline = time.monotonic() + timeout
    while not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


class Page:
    """One tab of a :class:`Browser`."""

    def __init__(self, browser: Browser, target: str, session: str) -> None:
        self.browser = browser
        self.target = target
        self.session = session

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript ``expression`` in the page (a JSON value)."""
        result = self.browser.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=self.session,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Evaluate ``expression`` until its value is true, and return it; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:  # the page is still loading: its names are not there yet
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {expression!r}\n"
                    f"console:\n{self.console()}\nDOM:\n{self.dom()}\nChromium:\n{self.browser.output()}"
                )
            time.sleep(0.05)

    def dom(self) -> str:
        """The document as it is now, serialized."""
        return str(self.evaluate("document.documentElement.outerHTML"))

    def texts(self, selector: str) -> list[str]:
        """The text of every element matching a CSS ``selector``, in document order."""
        return list(
            self.evaluate(f"[...document.querySelectorAll({json.dumps(selector)})].map(e => e.textContent)")
        )

    def console(self) -> str:
        """What the page logged: console calls, uncaught exceptions and the browser's own messages."""
        lines = []
        for event in self.browser.events(self.session):
            params = event.get("params", {})
            if event["method"] == "Runtime.consoleAPICalled":
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                lines.append(f"console.{params.get('type')}: {args}")
            elif event["method"] == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                lines.append(
                    "exception: "
                    + (details.get("exception", {}).get("description") or details.get("text", ""))
                )
            elif event["method"] == "Log.entryAdded":
                entry = params.get("entry", {})
                lines.append(f"{entry.get('level')}: {entry.get('text')} {entry.get('url', '')}".rstrip())
        return "\n".join(lines)

    def close(self) -> None:
        """Close the tab (its connections with it)."""
        self.browser.call("Target.closeTarget", {"targetId": self.target})
