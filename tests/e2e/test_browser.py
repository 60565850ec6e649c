"""
examples/chat.pow and examples/tail.pow in a real browser: headless Chromium
(tests/support/browser.py) loads their pages from a real server, the pages'
scripts open a WebSocket and an EventSource, and the tests read the DOM
those scripts build. Without Chromium (apt-get install chromium) these
tests skip; the chat room is also driven without a browser, below.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import CHROMIUM, MISSING, Browser
from tests.support.kapowserver import KapowServer, wait_for
from tests.support.websocket import CLOSE, WebSocketClient

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip(MISSING)
    with Browser(tmp_path / "browser" / "profile") as running:
        yield running


def start_example(start_server: Any, name: str, **env: str) -> KapowServer:
    server = start_server(str(EXAMPLES / name), env={**os.environ, **env})
    server.wait_log(re.escape(name) + " exited with status 0")
    return server


def followers(path: Path) -> list[int]:
    """Live processes with ``path`` in their command line (the chat handlers' ``tail -F``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path).encode() in args and state != "Z":
            found.append(int(entry.name))
    return found


def messages(text: str) -> str:
    """A JavaScript condition: the chat page lists a message ``text``."""
    return f"[...document.querySelectorAll('#messages li.message')].some(e => e.textContent === {json.dumps(text)})"


def test_chat_page_shares_the_room(start_server: Any, browser: Browser, tmp_path: Path) -> None:
    room = tmp_path / "chat" / "room"
    server = start_example(start_server, "chat.pow", CHAT_DIR=str(room.parent))
    ann = browser.open(server.user + "/chat?name=ann")
    ann.wait_for("document.getElementById('status').textContent === 'open'")
    ann.wait_for(messages("ann joined"))
    # bob's page sends "hello there" by itself once connected (?say=)
    bob = browser.open(server.user + "/chat?name=bob&say=hello%20there")
    for page in (bob, ann):
        page.wait_for(messages("bob: hello there"))
        assert '<li class="message">bob: hello there</li>' in page.dom()
    assert ann.texts("#messages li") == ["ann joined", "bob joined", "bob: hello there"]
    assert bob.texts("#messages li") == ["bob joined", "bob: hello there"]
    assert room.read_text() == "ann joined\nbob joined\nbob: hello there\n"
    assert len(followers(room)) == 2

    # a tab closed: its connection, handler and background tail end with it
    bob.close()
    wait_for(lambda: len(followers(room)) == 1, 5, "bob's tail -F to end")
    server.wait_log(r'"GET /chat/ws\?name=bob HTTP/1\.1" 101 \d+ ')

    # the server stopping closes the others with 1001
    assert server.stop() == 0
    ann.wait_for("document.getElementById('status').textContent === 'closed (1001)'")
    wait_for(lambda: not followers(room), 5, "ann's tail -F to end")


def test_tail_page_follows_the_log(start_server: Any, browser: Browser, tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("".join(f"line {i}\n" for i in range(1, 13)))
    server = start_example(start_server, "tail.pow", LOGFILE=str(log))
    page = browser.open(server.user + "/tail")
    page.wait_for("document.querySelectorAll('#lines li').length >= 10")
    assert page.texts("#lines li.line") == [f"line {i}" for i in range(3, 13)]
    assert page.evaluate("document.getElementById('status').textContent") == "following"

    # new lines show as they are written, those that look like fields too
    with log.open("a") as f:
        f.write("line 13\nretry: 1\nid: 7\n")
    page.wait_for("document.querySelectorAll('#lines li').length >= 13")
    assert page.texts("#lines li")[-3:] == ["line 13", "retry: 1", "id: 7"]
    assert '<li class="line">line 13</li>' in page.dom()
    assert page.evaluate("document.querySelectorAll('li.notice').length") == 0  # no reconnection

    page.close()
    server.wait_log(r'"GET /tail/events HTTP/1\.1" 200 ')
    wait_for(lambda: not followers(log), 5, "the tail -F to end")


def test_chat_room_without_a_browser(start_server: Any, tmp_path: Path) -> None:
    """Two connections share the room; what one sends at once is not lost to its own tail."""
    room = tmp_path / "chat" / "room"
    server = start_example(start_server, "chat.pow", CHAT_DIR=str(room.parent))
    ws = server.user.replace("http://", "ws://") + "/chat/ws"
    first = WebSocketClient(ws + "?name=a%2Fb")  # not a valid name
    second = WebSocketClient(ws + "?name=carol")
    try:
        assert first.handshake()[0] == 101
        assert first.recv().text == "anonymous joined"
        assert second.handshake()[0] == 101
        second.send_text("hi\nthere")  # before its handler even started
        expected = ["carol joined", "carol: hi", "carol: there"]
        assert [second.recv().text for _ in expected] == expected
        assert [first.recv().text for _ in expected] == expected
        second.close()
        frames, closing = second.messages_until_close()
        assert (frames, closing.close_code) == ([], 1000)
        wait_for(lambda: len(followers(room)) == 1, 5, "carol's tail -F to end")
        first.close()
        assert first.recv().opcode == CLOSE
        wait_for(lambda: not followers(room), 5, "the other tail -F to end")
    finally:
        first.shutdown()
        second.shutdown()
