"""The playground as a user of an LLM agent expects, in headless Chromium (see test_playground.py).

Replies render as Markdown while they stream and after, safely (raw HTML in a reply is text);
code blocks have a copy button; the banner's ``#secret=`` link connects with no typing; on a
390 px phone the conversation gets the height. The echo agent echoes the message, so a Markdown
message gets a Markdown reply, streamed word by word.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from test_playground import Tab, ThreadServer, echo_config, screenshot

import connic
from conftest import SECRET

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (test extra)")

CODE = 'print("hello")\nfor n in range(3):\n    print(n)\n'
MARKDOWN = f"""Here is **bold** and `inline` code:

```python
{CODE}```

- first item
- second item

| name | value |
|------|-------|
| a    | 1     |

See [the docs](https://example.com/docs) for more."""

HOSTILE = (
    "<img src=x onerror=\"window.pwned='img'\"> and "
    "<script>window.pwned='script'</script> and "
    "[a link](javascript:window.pwned='link') and "
    "![tracker](https://example.com/pixel.png)"
)


@pytest.fixture(scope="module")
def served() -> Iterator[ThreadServer]:
    """The slow echo of test_playground.py (0.1 s a word): long enough to look at a reply mid-stream."""
    server = ThreadServer(connic.create_app(echo_config())).start()
    yield server
    server.stop()


def new_tab(browser: Any, **options: Any) -> Iterator[Tab]:
    context = browser.new_context(**{"viewport": {"width": 1100, "height": 820}, **options})
    tab = Tab(context.new_page())
    yield tab
    context.close()
    assert not tab.errors, tab.errors


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    yield from new_tab(browser)


def open_connected(tab: Tab, served: ThreadServer) -> None:
    """Open the banner's kind of link; the page connects by itself."""
    tab.page.goto(f"{served.http}/#secret={SECRET}")
    tab.page.wait_for_selector("#message:enabled")


# --- Markdown -------------------------------------------------------------------------------------


def test_markdown_renders_while_streaming_and_after(
    tab: Tab, served: ThreadServer, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tab.page
    open_connected(tab, served)
    tab.say(MARKDOWN)
    # While the reply is still streaming, the code block is already HTML: a <pre><code>.
    page.wait_for_function(
        """() => {
        const turn = document.querySelector('.turn.agent[data-state="streaming"]');
        const code = turn && turn.querySelector('.text pre > code');
        return code !== null && code.textContent.includes('print');
    }"""
    )
    assert tab.reply("msg-001").get_attribute("data-state") == "streaming"
    page.wait_for_selector('.turn.agent[data-state="done"]')
    reply = tab.reply("msg-001").locator(".text")
    assert reply.locator("pre > code").count() == 1
    assert reply.locator("pre > code").text_content() == CODE
    assert reply.locator("pre > code").get_attribute("class") == "language-python"
    assert reply.locator(".code-head").get_attribute("data-lang") == "python"
    assert reply.locator("strong").text_content() == "bold"
    assert reply.locator(":not(pre) > code").text_content() == "inline"
    assert reply.locator("ul > li").all_inner_texts() == ["first item", "second item"]
    assert reply.locator("table th").all_inner_texts() == ["name", "value"]
    assert reply.locator("table td").all_inner_texts() == ["a", "1"]
    link = reply.locator("a")
    assert link.get_attribute("href") == "https://example.com/docs"
    assert link.get_attribute("target") == "_blank"
    assert set(str(link.get_attribute("rel")).split()) == {"noopener", "noreferrer"}
    # The user's own message stays as typed.
    assert page.locator('.exchange[data-id="msg-001"] .turn.user .bubble').text_content() == MARKDOWN
    screenshot(tab, "playground-markdown.png", capsys)


def test_html_in_a_reply_is_text_and_runs_nothing(browser: Any, served: ThreadServer) -> None:
    # The page's CSP would block an inline handler anyway: bypass it, so only the sanitising is tested.
    for tab in new_tab(browser, bypass_csp=True):
        page = tab.page
        open_connected(tab, served)
        tab.say(HOSTILE)
        page.wait_for_selector('.turn.agent[data-state="done"]')
        page.wait_for_timeout(300)  # give an <img>'s onerror time to fire, had one been made
        reply = tab.reply("msg-001").locator(".text")
        assert page.evaluate("() => window.pwned") is None
        assert reply.locator("img, script").count() == 0
        text = reply.inner_text()
        assert "<img src=x onerror=\"window.pwned='img'\">" in text
        assert "<script>window.pwned='script'</script>" in text
        # A javascript: link loses its href; a Markdown image is a link, never loaded.
        assert reply.locator("a", has_text="a link").get_attribute("href") is None
        image = reply.locator("a", has_text="[image: tracker]")
        assert image.get_attribute("href") == "https://example.com/pixel.png"


def test_rendering_is_throttled_per_animation_frame(tab: Tab, served: ThreadServer) -> None:
    # 400 chunks in one burst from a scripted server: far fewer renders than chunks.
    page = tab.page
    chunks = [f"w{n} " for n in range(400)]

    def handler(ws: Any) -> None:
        def on_message(message: str | bytes) -> None:
            frame = json.loads(message)
            if "secret" in frame:
                ws.send(json.dumps({"type": "connected", "session_id": "s", "agents": ["assistant"]}))
                return
            ws.send(json.dumps({"type": "stream_start", "id": frame["id"], "agent": "assistant"}))
            for chunk in chunks:
                ws.send(json.dumps({"type": "stream_chunk", "id": frame["id"], "agent": "assistant", "chunk": chunk}))

        ws.on_message(on_message)

    page.route_web_socket(re.compile(r".*/ws$"), handler)
    open_connected(tab, served)
    page.evaluate(
        """() => {
        window.renders = 0;
        new MutationObserver((records) => {
          for (const r of records) if (r.target.classList && r.target.classList.contains('text')) window.renders++;
        }).observe(document.getElementById('log'), {subtree: true, childList: true});
    }"""
    )
    tab.say("go")
    page.wait_for_function(
        "(n) => (document.querySelector('.turn.agent .text') || {}).textContent?.trim() === n",
        arg="".join(chunks).strip(),
    )
    renders = page.evaluate("() => window.renders")
    assert 1 <= renders < len(chunks) / 4, renders


def test_copy_button_copies_the_code(browser: Any, served: ThreadServer) -> None:
    for tab in new_tab(browser, permissions=["clipboard-read", "clipboard-write"]):
        page = tab.page
        open_connected(tab, served)
        tab.say(f"```\n{CODE}```")
        page.wait_for_selector('.turn.agent[data-state="done"]')
        button = tab.reply("msg-001").locator(".code-block button.copy")
        assert button.get_attribute("aria-label") == "Copy code"
        assert tab.reply("msg-001").locator(".text").text_content() == CODE  # the label is not text
        button.click()
        page.wait_for_function("() => document.querySelector('button.copy').dataset.label === 'Copied'")
        assert page.evaluate("() => navigator.clipboard.readText()") == CODE


# --- the banner's link ----------------------------------------------------------------------------


def test_fragment_link_connects_with_no_typing_and_leaves_the_address_bar(tab: Tab, served: ThreadServer) -> None:
    page = tab.page
    page.goto(f"{served.http}/#secret={SECRET}")
    page.wait_for_selector("#session:not([hidden])")  # connected: nothing typed, nothing clicked
    assert tab.sent[0] == {"secret": SECRET}
    assert page.url == f"{served.http}/"  # the fragment is gone (history.replaceState)
    assert page.input_value("#secret") == SECRET
    # On a wide screen the card stays open.
    assert page.is_visible("#connect-form") and not page.is_visible("#connection-toggle")
    # A link pasted into the open tab (only the fragment changes: no reload) fills the form but
    # does not end the session it has; after Disconnect it connects.
    page.evaluate("() => { location.hash = 'secret=another'; }")
    page.wait_for_function("() => location.hash === ''")
    assert page.input_value("#secret") == "another" and len(tab.sent) == 1
    page.click("#disconnect")
    page.evaluate(f"() => {{ location.hash = 'secret={SECRET}'; }}")
    page.wait_for_function("() => document.getElementById('status-text').textContent === 'Connected'")
    assert tab.sent[-1] == {"secret": SECRET}


def test_fragment_picks_the_connector_and_query_secret_still_waits(tab: Tab, served: ThreadServer) -> None:
    page = tab.page
    page.goto(f"{served.http}/#connector=/limited&secret={SECRET}")
    page.wait_for_selector("#message:enabled")
    assert page.input_value("#connector") == "limited"
    assert "1 message per session" in str(page.text_content("#limits"))
    # ?secret= (the old form) fills the field but connects only when asked.
    tab.open(f"{served.http}/?secret={SECRET}")
    page.wait_for_timeout(300)
    assert page.input_value("#secret") == SECRET and page.is_enabled("#connect")
    assert page.text_content("#status-text") == "Not connected"


# --- a phone --------------------------------------------------------------------------------------


def test_phone_gives_the_conversation_the_height(
    browser: Any, served: ThreadServer, capsys: pytest.CaptureFixture[str]
) -> None:
    phone = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
    for tab in new_tab(browser, **phone):
        page = tab.page
        tab.open(f"{served.http}/")
        assert page.is_visible("#connect-form")  # not connected: the form is what the page is for
        open_connected(tab, served)
        tab.say(MARKDOWN)
        page.wait_for_selector('.turn.agent[data-state="done"]')
        assert not page.is_visible("#connect-form") and not page.is_visible("#session")
        assert "/ws · assistant" in str(page.text_content("#connection-summary"))
        height = page.evaluate("() => document.getElementById('log').getBoundingClientRect().height")
        assert height >= 0.6 * 844, height
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390, width  # nothing wider than the screen (tables and code scroll inside)
        screenshot(tab, "playground-phone.png", capsys)
        page.click("#connection-toggle")
        assert page.is_visible("#connect-form") and page.is_visible("#session")
        assert page.get_attribute("#connection-toggle", "aria-expanded") == "true"
        screenshot(tab, "playground-phone-details.png", capsys)
        page.click("#connection-toggle")
        assert not page.is_visible("#connect-form")
        # A session that ends opens the card again: Connect is what comes next.
        page.click("#connection-toggle")
        page.click("#disconnect")
        page.click("#connection-toggle")
        page.wait_for_selector("#message:disabled")
        assert page.get_attribute("#connection", "data-collapsed") == "true"
        page.click("#connection-toggle")
        page.evaluate("() => { location.hash = 'connect'; }")  # and the phone connects from a link
        page.wait_for_selector("#message:enabled")
        assert not page.is_visible("#connect-form")
