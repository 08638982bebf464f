"""The agui connector's browser page (docs/agui.md), driven in real headless Chromium by Playwright:
it POSTs AG-UI runs and shows the SSE events as they come."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_agui_support import SECRET, agui_config, agui_registry
from test_playground import ThreadServer, http_get

import connic

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (test extra)")

TIMEOUT_MS = 10_000


@pytest.fixture(scope="module")
def served() -> Iterator[ThreadServer]:
    agents = {"assistant": {"use": "echo", "demo_tools": True, "delay": 0.05}, "other": {"use": "echo"}}
    server = ThreadServer(connic.create_app(agui_config(agents=agents), registry=agui_registry())).start()
    yield server
    server.stop()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors


def test_the_page_is_served_without_secrets(served: ThreadServer) -> None:
    status, headers, body = http_get(served.http + "/agui")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert '<option value="assistant">assistant</option>' in body
    assert SECRET not in body
    status, headers, _ = http_get(served.http + "/agui/page.js")
    assert status == 200 and headers["Content-Type"] == "text/javascript; charset=utf-8"


def test_a_conversation_streams_tools_text_and_usage(served: ThreadServer, page: Any) -> None:
    page.goto(served.http + "/agui")
    page.fill("#secret", SECRET)
    page.select_option("#agent", "assistant")
    page.fill("#message", "hello there world")
    page.press("#message", "Enter")
    page.wait_for_selector(".usage")
    assert page.inner_text(".assistant") == "hello there world"
    assert page.get_attribute(".assistant", "data-name") == "assistant"
    tools = page.locator(".tool").all_inner_texts()
    assert tools == ['tool word_count {"text": "hello there world"}', '→ {"words": 3}']
    assert page.inner_text(".step") == "thinking…"
    assert page.inner_text(".usage") == "3 in, 3 out"
    # The second run continues the thread: the server's history, the page's own copy.
    page.fill("#message", "again")
    page.press("#message", "Enter")
    page.wait_for_function("() => document.querySelectorAll('.usage').length === 2")
    assert page.locator(".assistant").all_inner_texts() == ["hello there world", "again"]


def test_a_wrong_secret_shows_the_401(served: ThreadServer, page: Any) -> None:
    page.goto(served.http + "/agui")
    page.fill("#secret", "wrong")
    page.fill("#message", "hi")
    page.press("#message", "Enter")
    page.wait_for_selector(".error")
    assert page.inner_text(".error") == "HTTP 401: missing or wrong secret"
