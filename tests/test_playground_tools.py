"""The playground shows tool calls and progress events (PROTOCOL.md §9), in headless Chromium.

The echo agent's ``demo_tools`` reports ``Progress("thinking")`` and a ``word_count`` tool
call before echoing, on a connector with ``progress_events = true``; a second connector's
agent reports a tool that failed. The page asks for nothing special: it shows the frames
when they come, in the agent's bubble, above the reply's (Markdown) text.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from test_playground import Tab, ThreadServer, screenshot

import connic
from conftest import SECRET, make_config
from helpers import test_registry

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (test extra)")

MESSAGE = "**one** two three four"


class FailingTool(connic.Agent):
    """A tool call whose tool fails, then a sentence."""

    async def respond(self, turn: connic.Turn) -> AsyncIterator[Any]:
        yield connic.ToolCall("t1", "lookup", {"key": turn.message})
        yield connic.ToolResult("t1", "lookup", "not found", is_error=True)
        yield "No luck."


@pytest.fixture(scope="module")
def served() -> Iterator[ThreadServer]:
    """Echo with demo tools (0.2 s between events and words, to watch them arrive) and a failing tool."""
    agents = {"assistant": {"use": "echo", "delay": 0.2, "demo_tools": True}, "failing": {"use": "failing"}}
    config = make_config({"progress_events": True, "agents": ["assistant"]}, agents)
    config["connectors"].append({"path": "/fail", "secrets": [SECRET], "progress_events": True, "agents": ["failing"]})
    registry = test_registry()
    registry.register("agents", "failing", FailingTool)
    server = ThreadServer(connic.create_app(config, registry=registry)).start()
    yield server
    server.stop()


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1100, "height": 820})
    tab = Tab(context.new_page())
    yield tab
    context.close()
    assert not tab.errors, tab.errors


def test_tool_call_appears_expandable_before_the_text(
    tab: Tab, served: ThreadServer, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tab.page
    page.goto(f"{served.http}/#secret={SECRET}")
    page.wait_for_selector("#message:enabled")
    # What the bubble showed, in order: the progress line, the tool call, the first text.
    page.evaluate(
        """() => {
        window.seen = [];
        const note = (what) => { if (window.seen[window.seen.length - 1] !== what) window.seen.push(what); };
        new MutationObserver(() => {
          const turn = document.querySelector('.turn.agent');
          if (!turn) return;
          const line = turn.querySelector('.progress-line');
          if (line) note('progress:' + line.textContent);
          if (turn.querySelector('.tool')) note('tool');
          if (turn.querySelector('.text').textContent) note('text');
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }"""
    )
    tab.say(MESSAGE)
    reply = tab.reply("msg-001")
    tool = reply.locator("details.tool")
    tool.wait_for()
    # The tool call is there before any of the reply's text, collapsed, named.
    assert reply.locator(".text").text_content() == ""
    assert tool.evaluate("(node) => node.open") is False
    assert "word_count" in tool.locator("summary").inner_text()
    assert not tool.locator(".tool-args").is_visible()

    tool.locator("summary").click()
    assert tool.evaluate("(node) => node.open") is True
    args = tool.locator(".tool-args pre")
    assert args.is_visible()
    assert json.loads(args.inner_text()) == {"text": MESSAGE}
    page.wait_for_selector('.tool[data-state="done"] .tool-result')
    assert json.loads(tool.locator(".tool-result pre").inner_text()) == {"words": 4}
    assert tool.locator(".tool-state").inner_text() == "done"

    page.wait_for_selector('.turn.agent[data-state="done"]')
    # The reply's text is still Markdown, and holds nothing of the tool call.
    assert reply.locator(".text strong").inner_text() == "one"
    assert reply.locator(".text").inner_text() == "one two three four"
    assert reply.locator(".progress-line").count() == 0  # the text replaced the progress line
    seen = page.evaluate("window.seen")
    assert seen[:3] == ["progress:thinking…", "tool", "text"], seen
    # The page asked for nothing special: the seed's frames only.
    assert tab.sent == [{"secret": SECRET}, {"type": "message", "id": "msg-001", "payload": {"message": MESSAGE}}]
    screenshot(tab, "playground-tool-call.png", capsys)


def test_a_failed_tool_call_is_marked_as_an_error(tab: Tab, served: ThreadServer) -> None:
    page = tab.page
    page.goto(f"{served.http}/#secret={SECRET}&connector=/fail")
    page.wait_for_selector("#message:enabled")
    tab.say("the key")
    reply = tab.reply("msg-001", "failing")
    page.wait_for_selector('.turn.agent[data-state="done"]')
    tool = reply.locator("details.tool")
    assert tool.get_attribute("data-state") == "error"
    assert tool.locator(".tool-state").inner_text() == "error"
    tool.locator("summary").click()
    assert tool.locator(".tool-result .tool-label").inner_text().lower() == "error"
    assert json.loads(tool.locator(".tool-result pre").inner_text()) == "not found"
    assert json.loads(tool.locator(".tool-args pre").inner_text()) == {"key": "the key"}
    assert reply.locator(".text").inner_text() == "No luck."
