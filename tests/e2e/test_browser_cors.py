"""
Cross-origin calls in a real browser (SPEC.md §13): headless Chromium
(tests/support/browser.py) loads the page of examples/cors-api.pow from one
real server (origin A, ``http://127.0.0.1:PORT_A``), and the page's script
calls ``fetch()`` on the API of a second real server (origin B) with a header
of its own, so the browser sends a preflight first. When B lists A with
``--cors``, the page shows the answers, 429 included; when it does not, the
browser refuses the call ("TypeError: Failed to fetch") and no process ran
on B. Without Chromium (apt-get install chromium) these tests skip.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.support.browser import CHROMIUM, MISSING, Browser, Page
from tests.support.kapowserver import KapowServer, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

PREFLIGHT = r'"OPTIONS /api/likes HTTP/1\.1" {code} '


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip(MISSING)
    with Browser(tmp_path / "browser" / "profile") as running:
        yield running


def start_example(start_server: Any, **env: str) -> KapowServer:
    server = start_server(str(EXAMPLES / "cors-api.pow"), env={**os.environ, **env})
    server.wait_log(r"cors-api\.pow exited with status 0")
    return server


def open_page(browser: Browser, pages: KapowServer, api: KapowServer) -> Page:
    """The likes page from ``pages``, calling the API of ``api``."""
    page = browser.open(f"{pages.user}/likes?api={quote(api.user, safe='')}")
    page.wait_for("document.getElementById('api').textContent.endsWith('/api/likes')")
    return page


def like(page: Page) -> str:
    """Click Like once and return what the page shows of the answer."""
    before = page.evaluate("document.querySelectorAll('#answers li').length")
    page.evaluate("document.getElementById('like').click()")
    page.wait_for(f"document.querySelectorAll('#answers li').length > {before}")
    return str(page.texts("#answers li")[-1])


def likes(directory: Path) -> int:
    """How many likes a server counted: one byte each."""
    store = directory / "likes"
    return len(store.read_bytes()) if store.exists() else 0


def test_a_listed_origin_calls_the_api(start_server: Any, browser: Browser, tmp_path: Path) -> None:
    pages = start_example(start_server, LIKES_DIR=str(tmp_path / "a"))
    origin = pages.user.rstrip("/")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", origin), origin
    api = start_example(start_server, CORS_ORIGIN=origin, LIKES_DIR=str(tmp_path / "b"))
    assert api.user != pages.user  # two origins: another port is another origin
    page = open_page(browser, pages, api)

    assert like(page) == "liked: 1"
    assert page.evaluate("document.getElementById('likes').textContent") == "1"
    assert '<li class="ok">liked: 1</li>' in page.dom()
    # the header of its own made the browser ask first, and B answered it itself
    api.wait_log(PREFLIGHT.format(code=204))
    api.wait_log(r'"POST /api/likes HTTP/1\.1" 200 ')
    assert (likes(tmp_path / "b"), likes(tmp_path / "a")) == (1, 0)

    # --rate 60/m --burst 10: the page reads the 429 (it carries the CORS
    # headers too), and nothing ran for it
    shown = [like(page) for _ in range(9)]
    while not shown[-1].startswith("429"):
        assert len(shown) < 20, shown
        shown.append(like(page))
    assert shown[-1] == "429: too many likes, wait a moment"
    assert shown[:9] == [f"liked: {n}" for n in range(2, 11)]
    assert all(s.startswith("liked: ") for s in shown[:-1])
    assert likes(tmp_path / "b") == len(shown)  # the 200s and the first like
    assert "Failed to fetch" not in page.dom()
    # one preflight, kept by the browser for --cors-max-age (600 s)
    assert sum('"OPTIONS /api/likes ' in line for line in api.lines) == 1


def test_an_origin_not_listed_is_refused_by_the_browser(
    start_server: Any, browser: Browser, tmp_path: Path
) -> None:
    pages = start_example(start_server, LIKES_DIR=str(tmp_path / "a"))
    # CORS_ORIGIN left to its default, http://localhost:8000: not the page's
    api = start_example(start_server, LIKES_DIR=str(tmp_path / "b"))
    page = open_page(browser, pages, api)

    assert like(page) == "TypeError: Failed to fetch"
    assert '<li class="failed">TypeError: Failed to fetch</li>' in page.dom()
    assert page.evaluate("document.getElementById('likes').textContent") == "?"
    # the reason is for the console only
    wait_for(lambda: page.evaluate("1") and "blocked by CORS policy" in page.console(), 5, "the console")
    # B refused the preflight, so the browser never sent the POST: no process ran
    api.wait_log(PREFLIGHT.format(code=403))
    assert not (tmp_path / "b" / "likes").exists()
    assert not any('"POST /api/likes ' in line for line in api.lines)
    assert api.kapow("handler", "list").stdout.strip() == "[]"
    # and the same page may still call its own server's API (same origin):
    # no preflight, no CORS at all
    assert like(open_page(browser, pages, pages)) == "liked: 1"
    assert likes(tmp_path / "a") == 1
