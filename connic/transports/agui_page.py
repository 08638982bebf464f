"""A small browser page for an agui connector: chat with its agents over AG-UI (docs/agui.md).

Served at ``GET {path}`` when ``[server] playground`` is on. The page POSTs each run
as a ``RunAgentInput`` and reads the SSE stream itself (``fetch`` and a stream
reader, no library): text, tool calls, steps, errors and usage as they come. It
holds no secret: the user types it, and it goes only to this origin.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

__all__ = ["HEADERS", "SCRIPT", "page"]

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
    ),
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


def page(path: str, agents: Sequence[str]) -> str:
    """The page's HTML for the connector at ``path`` serving ``agents``."""
    options = "".join(f'<option value="{html.escape(a)}">{html.escape(a)}</option>' for a in agents)
    config = html.escape(json.dumps({"path": path}))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>connic AG-UI</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 48em; padding: 0 1em; }}
fieldset {{ border: 1px solid #ccc; display: flex; gap: .5em; flex-wrap: wrap; align-items: center; }}
#log > div {{ margin: .4em 0; white-space: pre-wrap; }}
.user {{ color: #124; font-weight: 600; }} .assistant::before {{ content: attr(data-name) ": "; color: #666; }}
.tool, .step, .usage {{ color: #555; font-size: 90%; }} .error {{ color: #a00; }}
</style></head>
<body data-config="{config}">
<h1>AG-UI at <code>{html.escape(path)}</code></h1>
<fieldset>
<label>Secret <input id="secret" type="password" autocomplete="off"></label>
<label>Agent <select id="agent"><option value="">all</option>{options}</select></label>
<span>thread <code id="thread"></code></span> <button id="new-thread" type="button">New thread</button>
</fieldset>
<div id="log" aria-live="polite"></div>
<form id="form"><textarea id="message" rows="2" cols="60" placeholder="Message"></textarea>
<button id="send" type="submit">Send</button> <button id="stop" type="button" disabled>Stop</button></form>
<script src="{html.escape(path.rstrip("/"))}/page.js"></script>
</body></html>
"""


SCRIPT = r"""// connic's AG-UI page: POST a RunAgentInput, read the SSE stream, show each event.
"use strict";
const config = JSON.parse(document.body.dataset.config);
const $ = (id) => document.getElementById(id);
const log = $("log");
let thread = crypto.randomUUID();
let messages = [];  // the client's copy of the conversation (connic keeps its own, docs/agui.md)
let abort = null;

function line(kind, text, name) {
  const div = document.createElement("div");
  div.className = kind;
  if (name) div.dataset.name = name;
  div.textContent = text;
  log.append(div);
  return div;
}

function newThread() {
  thread = crypto.randomUUID();
  messages = [];
  $("thread").textContent = thread;
  log.replaceChildren();
}

const open = {};  // messageId -> its element
function show(event) {
  switch (event.type) {
    case "TEXT_MESSAGE_START":
      open[event.messageId] = line("assistant", "", event.name || "assistant");
      open[event.messageId].dataset.id = event.messageId;
      break;
    case "TEXT_MESSAGE_CONTENT":
      open[event.messageId].textContent += event.delta;
      break;
    case "TEXT_MESSAGE_END": {
      const el = open[event.messageId];
      messages.push({ id: event.messageId, role: "assistant", name: el.dataset.name, content: el.textContent });
      break;
    }
    case "TOOL_CALL_START": line("tool", `tool ${event.toolCallName}`).dataset.call = event.toolCallId; break;
    case "TOOL_CALL_ARGS":
      log.querySelector(`[data-call="${event.toolCallId}"]`).textContent += ` ${event.delta}`;
      break;
    case "TOOL_CALL_RESULT": line("tool", `→ ${event.content}`); break;
    case "STEP_STARTED": line("step", `${event.stepName}…`); break;
    case "RUN_ERROR": line("error", `${event.code}: ${event.message}`); break;
    case "RUN_FINISHED": {
      const usage = (event.usage || [])[0];
      const cancelled = event.outcome && event.outcome.type === "cancelled" ? " (cancelled)" : "";
      line("usage", usage ? `${usage.inputTokens} in, ${usage.outputTokens} out${cancelled}` : `done${cancelled}`);
      break;
    }
  }
}

async function run(text) {
  const user = { id: crypto.randomUUID(), role: "user", content: text };
  messages.push(user);
  line("user", text);
  const agent = $("agent").value;
  const input = {
    threadId: thread, runId: crypto.randomUUID(), state: {}, messages, tools: [], context: [], forwardedProps: {},
  };
  abort = new AbortController();
  $("stop").disabled = false;
  try {
    const response = await fetch(config.path + (agent ? "/" + encodeURIComponent(agent) : ""), {
      method: "POST",
      headers: {
        "Content-Type": "application/json",
        Accept: "text/event-stream",
        Authorization: "Bearer " + $("secret").value,
      },
      body: JSON.stringify(input),
      signal: abort.signal,
    });
    if (!response.ok) {
      line("error", `HTTP ${response.status}: ${(await response.text()).trim()}`);
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (data) show(JSON.parse(data));
      }
    }
  } catch (err) {
    line("error", err.name === "AbortError" ? "stopped" : String(err));
  } finally {
    abort = null;
    $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("message").value.trim();
  if (!text || abort) return;
  $("message").value = "";
  run(text);
});
$("message").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => abort && abort.abort());
$("new-thread").addEventListener("click", newThread);
newThread();
"""
