// connic playground: plain JavaScript, no external requests. Its only libraries are vendored
// beside it (connic/static/vendor/): marked renders agent replies as Markdown, DOMPurify
// sanitises the result. Speaks the Connic WebSocket protocol (docs/protocol.md) to a connector
// of this server.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("connic-config").textContent);
  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"),
    statusText: $("status-text"),
    connectForm: $("connect-form"),
    connector: $("connector"),
    connectorUrl: $("connector-url"),
    secret: $("secret"),
    reveal: $("reveal"),
    connect: $("connect"),
    reconnect: $("reconnect"),
    disconnect: $("disconnect"),
    session: $("session"),
    sessionId: $("session-id"),
    agents: $("agents"),
    limits: $("limits"),
    log: $("log"),
    empty: $("empty"),
    composer: $("composer"),
    message: $("message"),
    send: $("send"),
    stop: $("stop"),
    context: $("context"),
    contextError: $("context-error"),
    agent: $("agent"),
    announcer: $("announcer"),
    connection: $("connection"),
    connectionSummary: $("connection-summary"),
    connectionToggle: $("connection-toggle"),
  };

  // Close codes and error codes of PROTOCOL.md section 6 that end the connection.
  const CLOSING_ERRORS = new Set([
    "unauthorized", "auth_timeout", "session_expired", "message_limit_reached",
    "message_too_large", "server_shutting_down", "slow_consumer", "session_taken_over",
  ]);
  const CLOSE_CODES = {
    4001: "unauthorized", 4002: "auth_timeout", 4008: "session_expired", 4009: "message_limit_reached",
    1009: "message_too_large", 1001: "server_shutting_down", 4010: "slow_consumer", 4011: "session_taken_over",
  };
  // Closes after which resuming is pointless (PROTOCOL.md section 7): the session has ended
  // (4001, 4008, 4009), it never started (4002), or another connection now holds it (4011).
  const FINAL_CLOSES = new Set([4001, 4002, 4008, 4009, 4011]);
  // Reconnect backoff: 0.25 s doubling to 5 s, each wait jittered by +-25 % so many pages
  // dropped at once by the same restart do not come back in lockstep.
  const BACKOFF_FIRST_MS = 250;
  const BACKOFF_MAX_MS = 5000;

  const state = {
    ws: null,
    url: "",
    opened: false,       // the socket opened (the handshake succeeded)
    connected: false,    // the server sent "connected"
    userClosed: false,
    restart: false,       // the server closed 1012 (restarting): reconnect even with no session to resume
    secretGiven: false,
    closeError: null,    // the error frame that announced the close, if any
    info: null,          // the "connected" frame
    secret: "",           // the secret the session was opened with, sent again when resuming
    resume: null,         // {session_id, resume_token} while the session can be resumed, else null
    lastSeq: 0,           // the highest "seq" seen in this session (PROTOCOL.md section 7)
    retry: null,          // the pending reconnect timer
    attempt: 0,           // reconnects tried since the connection dropped
    resuming: false,      // the current socket was opened to resume the session
    counter: 0,
    exchanges: new Map(), // message id -> exchange, for every exchange of this page
    pending: [],          // exchanges still waiting for a reply, oldest first
  };

  // ---------------------------------------------------------------- helpers

  function wsUrl(relative) {
    // Relative to this page, so it follows any prefix the page is served under.
    const url = new URL(relative, window.location.href);
    const scheme = url.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${url.host}${url.pathname}`;
  }

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function agentColor(name) {
    const agents = state.info ? state.info.agents : [];
    let index = agents.indexOf(name);
    if (index < 0) {
      index = 0;
      for (const ch of name) index = (index * 31 + ch.charCodeAt(0)) >>> 0;
    }
    return `var(--agent-${index % 6})`;
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  function seconds(value) {
    const n = Number(value);
    if (!Number.isFinite(n)) return "";
    return `${Number.isInteger(n) ? n : n.toFixed(1)} s`;
  }

  // The log follows new text while it is scrolled to the bottom; scrolling up pauses that.
  let stick = true;

  function nearBottom() {
    const log = el.log;
    return log.scrollHeight - log.scrollTop - log.clientHeight < 60;
  }

  function follow() {
    if (stick) el.log.scrollTop = el.log.scrollHeight;
  }

  function scrollDown() {
    stick = true;
    follow();
  }

  function append(node) {
    el.empty.hidden = true;
    el.log.append(node);
    follow();
    return node;
  }

  function notice(kind, text, code) {
    const node = make("div", `notice ${kind}`);
    node.append(make("span", "notice-text", text));
    if (code !== undefined && code !== null) node.append(make("span", "code", code));
    node.dataset.kind = kind;
    return append(node);
  }

  // Screen readers hear each finished reply once, not every chunk.
  function announce(text) {
    el.announcer.textContent = text;
  }

  function setStatus(status, text) {
    el.status.dataset.status = status;
    el.statusText.textContent = text;
  }

  // ------------------------------------------------------- Markdown

  // Agent replies are Markdown (code blocks, lists, tables, links). marked turns a reply into
  // HTML with any raw HTML in it escaped, so "<img src=x onerror=...>" shows as text; DOMPurify
  // then removes whatever active content is left (javascript: links, handlers) before anything
  // reaches the DOM. Images are shown as links: loading one would tell its server that the reply
  // was read (and the page's CSP blocks other origins anyway). Without the libraries (a build
  // that lost them) replies show as plain text, as before.
  const renderMarkdown = (() => {
    const lib = window.marked;
    const purify = window.DOMPurify;
    if (!lib || !purify || !purify.isSupported) return null;
    const entities = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
    const escape = (text) => String(text).replace(/[&<>"']/g, (c) => entities[c]);
    const md = new lib.Marked({
      gfm: true,
      breaks: true, // a single newline in a reply is a new line, as plain-text agents mean it
      renderer: {
        // Raw HTML is shown as the text it is; a block of it keeps its lines.
        html: (token) => (token.block ? `<p>${escape(token.text.trim()).replace(/\n/g, "<br>")}</p>` : escape(token.text)),
        image: (token) => {
          const label = escape(token.text || token.href);
          return `<a href="${escape(token.href)}" class="image-link">[image: ${label}]</a>`;
        },
      },
    });
    purify.addHook("afterSanitizeAttributes", (node) => {
      // Links leave the page in a new tab, without a handle back to it or a Referer.
      if (node.tagName === "A" && node.hasAttribute("href")) {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer");
      }
    });
    const options = { FORBID_TAGS: ["img", "style", "form"], FORBID_ATTR: ["style"], RETURN_DOM_FRAGMENT: true };
    return (text) => purify.sanitize(md.parse(text).trim(), options);
  })();

  // Each code block gets a bar with its language and a copy button. Their words are CSS
  // (data-lang, data-label), so the bubble's text stays the reply's own.
  function addCopyButtons(root) {
    for (const pre of root.querySelectorAll("pre")) {
      const wrap = make("div", "code-block");
      pre.replaceWith(wrap);
      const head = make("div", "code-head");
      const language = /(?:^|\s)language-(\S+)/.exec(pre.firstElementChild?.className || "");
      head.dataset.lang = language ? language[1] : "";
      const button = make("button", "copy");
      button.type = "button";
      button.dataset.label = "Copy";
      button.setAttribute("aria-label", "Copy code");
      head.append(button);
      wrap.append(head, pre);
    }
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    // Plain http from another machine is not a secure context: no Clipboard API there.
    const area = make("textarea", "visually-hidden");
    area.value = text;
    document.body.append(area);
    area.select();
    const done = document.execCommand("copy");
    area.remove();
    if (!done) throw new Error("copy refused");
  }

  function onCopy(button) {
    const pre = button.closest(".code-block")?.querySelector("pre");
    if (!pre) return;
    copyText(pre.textContent).then(
      () => { button.dataset.label = "Copied"; },
      () => { button.dataset.label = "Copy failed"; },
    ).finally(() => setTimeout(() => { button.dataset.label = "Copy"; }, 1500));
  }

  // ------------------------------------------------------- plain words

  function describeClose(code, reason) {
    if (code === 1012) return "The server is restarting.";
    const error = state.closeError;
    const kind = (error && error.code) || CLOSE_CODES[code];
    const info = state.info || {};
    switch (kind) {
      case "unauthorized":
        return state.secretGiven
          ? "Wrong secret: the server refused it. Check it and connect again."
          : "This connector needs a secret: enter it and connect again.";
      case "auth_timeout":
        return "No secret arrived in time, so the server closed the connection.";
      case "session_expired": {
        const idle = info.session_timeout !== undefined ? seconds(info.session_timeout) : "";
        return idle
          ? `Session expired after ${idle} idle. Reconnect to start a new session.`
          : "Session expired after being idle too long. Reconnect to start a new session.";
      }
      case "message_limit_reached": {
        const max = info.max_messages;
        return max
          ? `Message limit reached: a session allows ${plural(max, "message")}. Reconnect to start a new session.`
          : "Message limit reached. Reconnect to start a new session.";
      }
      case "message_too_large":
        return "Message too large: the server closed the connection.";
      case "server_shutting_down":
        return "The server is shutting down.";
      case "slow_consumer":
        return "This page fell too far behind reading replies, so the server closed the connection.";
      case "session_taken_over":
        return "Another connection resumed this session (another tab?), so this one was closed.";
      default:
        break;
    }
    if (code === 1000) return state.userClosed ? "Disconnected." : "The server closed the connection.";
    if (code === 1001) return "The server went away.";
    if (code === 1011) return "The server hit an internal error and closed the connection.";
    if (code === 1006 && !state.opened) {
      return `Could not connect to ${state.url}. Is the server running? (It also refuses connections from ` +
        "an origin it does not allow, and when it has too many.)";
    }
    if (code === 1006 && state.resuming) return "Could not reach the server to resume the session.";
    if (code === 1006) return "The connection was lost.";
    return reason ? `Connection closed: ${reason}` : "Connection closed.";
  }

  function describeError(frame) {
    const message = frame.message || "";
    switch (frame.code) {
      case "agent_error":
        return `The agent failed: ${message}`;
      case "agent_timeout":
        return `The agent took too long and was stopped. ${message}`;
      case "unknown_agent":
        return `No such agent. ${message}`;
      case "rate_limited":
        return frame.retry_after !== undefined
          ? `Too many messages: try again in ${seconds(frame.retry_after)}.`
          : "Too many messages: slow down.";
      case "queue_full":
        return "Too many messages are waiting: let the replies finish first.";
      case "message_limit_reached":
        return `Not answered: message limit reached (${state.info ? state.info.max_messages : "?"} per session).`;
      case "server_shutting_down":
        return "Not answered: the server is shutting down.";
      case "invalid_message":
        return `The server rejected the message: ${message}`;
      case "invalid_json":
      case "unknown_type":
      case "unsupported_frame":
        return `The server did not understand a frame: ${message}`;
      case "not_found":
        return "Nothing to stop: that reply had already finished.";
      default:
        return message || frame.code || "Unknown error.";
    }
  }

  // ------------------------------------------------------- the connection card

  // On a phone the card folds to one line once connected, so the conversation gets the height;
  // the toggle opens it again (CSS applies data-collapsed only on narrow screens).
  function setCollapsed(collapsed) {
    el.connection.dataset.collapsed = String(collapsed);
    el.connectionToggle.setAttribute("aria-expanded", String(!collapsed));
    el.connectionToggle.textContent = collapsed ? "Details" : "Hide";
  }

  function showSummary() {
    const connector = selectedConnector();
    const path = connector ? connector.path : "";
    const agents = state.info && state.info.agents ? state.info.agents.join(", ") : "";
    el.connectionSummary.textContent = state.connected ? `${path} · ${agents}` : path;
  }

  // ------------------------------------------------------- connecting

  function selectedConnector() {
    const option = el.connector.selectedOptions[0];
    if (!option) return null;
    return { url: wsUrl(option.value), path: option.dataset.path, auth: option.dataset.auth === "yes" };
  }

  function showConnectorUrl() {
    const connector = selectedConnector();
    el.connectorUrl.textContent = connector ? connector.url : "no websocket connector";
    el.secret.placeholder = connector && !connector.auth ? "not needed: this connector has auth off" : "the connector's secret";
  }

  function setControls() {
    const live = state.ws !== null || state.retry !== null;
    const ready = state.connected && state.ws && state.ws.readyState === WebSocket.OPEN;
    el.connect.disabled = live || !selectedConnector();
    el.disconnect.disabled = !live;
    el.reconnect.disabled = !state.url || (live && !state.connected);
    el.connector.disabled = live;
    el.message.disabled = !ready;
    el.send.disabled = !ready;
    el.stop.disabled = !ready || state.pending.length === 0;
    el.message.placeholder = ready ? "Write a message…" : "Connect first, then write a message…";
  }

  function connect() {
    const connector = selectedConnector();
    if (!connector) return;
    if (state.ws) drop("Reconnecting: a new connection is a new session.");
    else if (state.retry !== null) stopRetrying("Reconnecting: a new connection is a new session.");
    state.secret = el.secret.value;
    state.resume = null;
    state.restart = false;
    state.lastSeq = 0;
    state.userClosed = false;
    open(connector, false);
  }

  // Open a socket to the connector: for a new session, or to resume state.resume.
  function open(connector, resuming) {
    const secret = state.secret;
    state.url = connector.url;
    state.opened = false;
    state.connected = false;
    state.resuming = resuming;
    state.closeError = null;
    state.secretGiven = secret !== "";
    if (!resuming) setStatus("connecting", "Connecting…");
    let ws;
    try {
      ws = new WebSocket(connector.url);
    } catch (err) {
      state.resume = null;
      interruptPending("interrupted");
      setStatus("closed", "Not connected");
      notice("error", `Could not connect: ${err.message}`);
      setControls();
      return;
    }
    state.ws = ws;
    ws.onopen = () => {
      if (state.ws !== ws) return;
      state.opened = true;
      if (resuming) {
        // PROTOCOL.md section 7: resume instead of authenticating; the secret rides along.
        const frame = { type: "resume", ...state.resume, last_seq: state.lastSeq };
        if (connector.auth || secret) frame.secret = secret;
        ws.send(JSON.stringify(frame));
        return;
      }
      // The seed's first frame: {"secret": "..."} (not needed when the connector has auth off).
      if (connector.auth || secret) ws.send(JSON.stringify({ secret }));
    };
    ws.onmessage = (event) => {
      if (state.ws !== ws) return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (err) {
        notice("warn", "The server sent a frame that is not JSON.");
        return;
      }
      onFrame(frame);
    };
    ws.onclose = (event) => {
      if (state.ws !== ws) return;
      onClosed(event.code, event.reason);
    };
    // A failed socket always gets a close event after its error event: onclose decides.
    ws.onerror = () => {};
    setControls();
  }

  // ------------------------------------------------------- resuming (PROTOCOL.md section 7)

  function canResume(code) {
    if (!state.resume || state.userClosed || FINAL_CLOSES.has(code)) return false;
    const error = state.closeError && state.closeError.code;
    return !["unauthorized", "session_expired", "message_limit_reached", "session_taken_over"].includes(error);
  }

  function scheduleReconnect(delay) {
    clearTimeout(state.retry);
    const wait = delay ?? Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** state.attempt) * (0.75 + Math.random() * 0.5);
    state.attempt += 1;
    setStatus("reconnecting", state.attempt > 1 ? `Reconnecting… (try ${state.attempt})` : "Reconnecting…");
    state.retry = setTimeout(() => {
      state.retry = null;
      const connector = selectedConnector();
      if (!connector || (!state.resume && !state.restart)) return;
      open(connector, state.resume !== null);
    }, wait);
    setControls();
  }

  function stopRetrying(text) {
    clearTimeout(state.retry);
    state.retry = null;
    state.resume = null;
    state.restart = false;
    state.attempt = 0;
    interruptPending("interrupted");
    notice("", text);
  }

  function onResumed(frame) {
    state.attempt = 0;
    if (frame.resume_token) state.resume = { session_id: frame.session_id, resume_token: frame.resume_token };
    if (frame.recovered === false) {
      // Frames we missed were already evicted: rebuild from the session's history.
      notice("warn", "Reconnected, but part of the conversation did not survive the break: reloading it.");
      state.ws.send(JSON.stringify({ type: "history" }));
    } else {
      notice("ok", "Reconnected: the session goes on.");
    }
  }

  function onHistory(frame) {
    const entries = Array.isArray(frame.entries) ? frame.entries : [];
    const old = state.exchanges;
    const running = new Set(state.pending);
    state.exchanges = new Map();
    state.pending = [];
    for (const node of [...el.log.children]) if (node !== el.empty) node.remove();
    el.empty.hidden = false;
    // One exchange per message id, in the order of the history; agent entries follow their user entry.
    const groups = new Map();
    for (const entry of entries) {
      if (!entry || typeof entry !== "object") continue;
      let group = groups.get(entry.id);
      if (!group) groups.set(entry.id, (group = { user: null, number: entry.message_number, agents: [] }));
      if (entry.role === "user") group.user = entry.text;
      else group.agents.push(entry);
    }
    for (const [id, group] of groups) {
      const previous = old.get(id);
      if (previous && running.has(previous)) {
        // Still being answered: keep its bubbles, which later frames keep filling in
        // (stream_end carries the whole reply, so a bubble that missed chunks ends right).
        append(previous.node);
        state.exchanges.set(id, previous);
        state.pending.push(previous);
        running.delete(previous);
        for (const entry of group.agents) {
          const bubble = previous.bubble(entry.agent || "agent");
          if (!bubble.finished) bubble.end(entry.text, null, "stop"); // ended during the break
        }
        continue;
      }
      const exchange = newExchange(id, group.user, [], undefined);
      exchange.acked = true;
      if (exchange.userMeta) exchange.userMeta.replaceChildren(make("span", "", `message #${group.number}`));
      for (const entry of group.agents) exchange.bubble(entry.agent || "agent").end(entry.text, null, "stop");
      finish(exchange);
    }
    // Sent before the break but unknown to the server: it never arrived.
    for (const exchange of running) {
      append(exchange.node);
      state.pending.push(exchange);
      state.exchanges.set(exchange.id, exchange);
    }
    interruptPending("interrupted", (exchange) => !groups.has(exchange.id));
    notice("ok", "Conversation reloaded from the server.");
    setControls();
  }

  // Close the current socket on the user's behalf (Disconnect, Reconnect).
  function drop(text) {
    const ws = state.ws;
    state.ws = null;
    state.resume = null; // a close with 1000 ends the session for good
    ws.onopen = ws.onmessage = ws.onclose = null;
    try { ws.close(1000); } catch (err) { /* already closed */ }
    interruptPending("interrupted");
    state.connected = false;
    notice("", text, "close 1000");
  }

  function disconnect() {
    if (!state.ws && state.retry !== null) {
      stopRetrying("Stopped reconnecting.");
      setStatus("idle", "Not connected");
      setControls();
      return;
    }
    if (!state.ws) return;
    drop("Disconnected.");
    setStatus("idle", "Not connected");
    showSummary();
    setCollapsed(false);
    setControls();
    el.connect.focus();
  }

  function onClosed(code, reason) {
    state.ws = null;
    state.connected = false;
    // 1012, service restart (`run --reload`): the server is back in a moment. Come back to it,
    // resuming if we can, else (resume_window = 0) with a new session; keep trying while it starts.
    if (code === 1012 && !state.userClosed) state.restart = true;
    if (state.restart && !state.resume && !state.userClosed && !FINAL_CLOSES.has(code)) {
      const first = state.attempt === 0;
      interruptPending("interrupted");
      if (first) notice("warn", `${describeClose(code, reason)} Reconnecting…`, `close ${code}`);
      scheduleReconnect();
      return;
    }
    if (canResume(code)) {
      // Replies keep going on the server: leave the bubbles as they are and resume.
      const first = state.attempt === 0;
      if (first) notice("warn", `${describeClose(code, reason)} Reconnecting…`, `close ${code}`);
      scheduleReconnect();
      return;
    }
    state.resume = null;
    state.attempt = 0;
    const text = describeClose(code, reason);
    interruptPending("interrupted");
    notice(code === 1000 ? "" : "error", text, `close ${code}`);
    setStatus("closed", state.closeError && state.closeError.code === "unauthorized" ? "Refused" : "Disconnected");
    showSummary();
    setCollapsed(false);
    setControls();
  }

  // ------------------------------------------------------- frames

  function onFrame(frame) {
    if (Number.isInteger(frame.seq)) {
      // Frames of a message are numbered per session; after a resume, one already seen is skipped.
      if (frame.seq <= state.lastSeq) return undefined;
      state.lastSeq = frame.seq;
    }
    switch (frame.type) {
      case "connected": return onConnected(frame);
      case "history": return onHistory(frame);
      case "ack": return onAck(frame);
      case "stream_start": return bubbleFor(frame).start();
      case "stream_chunk": return bubbleFor(frame).chunk(frame.chunk);
      case "stream_end": return bubbleFor(frame).end(frame.full_response, frame.token_usage, frame.finish_reason);
      case "response": return bubbleFor(frame).end(frame.response, frame.token_usage, frame.finish_reason);
      // Progress events (PROTOCOL.md §9) come only from a connector with progress_events on.
      case "tool_call": return bubbleFor(frame).toolCall(frame);
      case "tool_result": return bubbleFor(frame).toolResult(frame);
      case "progress": return bubbleFor(frame).progress(frame);
      case "error": return onError(frame);
      default: return undefined; // pong and anything new: clients ignore unknown frames
    }
  }

  function onConnected(frame) {
    state.connected = true;
    state.restart = false;
    state.info = frame;
    setStatus("connected", "Connected");
    clearTimeout(state.retry);
    state.retry = null;
    if (state.resuming && frame.resumed === true) {
      onResumed(frame);
      setControls();
      return;
    }
    if (state.resuming) {
      // The server could not resume (expired, ended, restarted without its store): a new session.
      interruptPending("interrupted");
      notice("warn", `The session could not be resumed: a new session ${frame.session_id} started.`);
    }
    state.attempt = 0;
    state.lastSeq = 0;
    state.resume = frame.resume_token ? { session_id: frame.session_id, resume_token: frame.resume_token } : null;
    el.session.hidden = false;
    el.sessionId.textContent = frame.session_id;
    el.agents.replaceChildren();
    const previous = el.agent.value;
    el.agent.replaceChildren(make("option", "", "All agents"));
    el.agent.firstChild.value = "";
    for (const name of frame.agents || []) {
      const chip = make("span", "chip", name);
      chip.style.setProperty("--agent-color", agentColor(name));
      el.agents.append(chip);
      const option = make("option", "", name);
      option.value = name;
      el.agent.append(option);
    }
    if ((frame.agents || []).includes(previous)) el.agent.value = previous;
    const limits = [];
    if (frame.streaming !== undefined) limits.push(frame.streaming ? "streaming" : "whole responses");
    if (frame.max_messages !== undefined) limits.push(`${plural(frame.max_messages, "message")} per session`);
    if (frame.session_timeout !== undefined) limits.push(`expires after ${seconds(frame.session_timeout)} idle`);
    el.limits.textContent = limits.join(" · ") || "—";
    if (!state.resuming) notice("ok", `Connected to ${state.url}: session ${frame.session_id}.`);
    showSummary();
    setCollapsed(true);
    setControls();
    el.message.focus();
  }

  function onAck(frame) {
    const exchange = state.exchanges.get(frame.id);
    if (!exchange) return;
    exchange.acked = true;
    exchange.userMeta.replaceChildren(make("span", "", `message #${frame.message_number}`));
    for (const name of exchange.expected) exchange.bubble(name);
  }

  function onError(frame) {
    const exchange = frame.id !== null && frame.id !== undefined ? state.exchanges.get(frame.id) : null;
    if (CLOSING_ERRORS.has(frame.code) && !exchange) {
      // The close follows: say it once, in onClosed.
      state.closeError = frame;
      return;
    }
    if (frame.code === "not_found" && exchange && exchange.cancelRequested) return;
    if (exchange && frame.agent) {
      exchange.bubble(frame.agent).fail(frame);
      return;
    }
    if (exchange) {
      exchange.fail(frame);
      return;
    }
    notice("error", describeError(frame), frame.code);
  }

  function bubbleFor(frame) {
    let exchange = state.exchanges.get(frame.id);
    if (!exchange) exchange = newExchange(frame.id, null, []); // a reply we did not ask for
    return exchange.bubble(frame.agent || "agent");
  }

  // ------------------------------------------------------- exchanges and bubbles

  function newExchange(id, text, expected, context) {
    const node = make("div", "exchange");
    node.dataset.id = String(id);
    const exchange = {
      id,
      node,
      expected,
      acked: false,
      done: false,
      cancelRequested: false,
      bubbles: new Map(),
      userMeta: null,
      bubble: (name) => exchange.bubbles.get(name) || newBubble(exchange, name),
      fail: (frame) => {
        if (exchange.userMeta) exchange.userMeta.replaceChildren(make("span", "badge error", "not answered"));
        const line = make("div", "notice error", describeError(frame));
        line.append(make("span", "code", frame.code));
        node.append(line);
        follow();
        for (const bubble of exchange.bubbles.values()) if (!bubble.finished) bubble.node.remove();
        exchange.bubbles.clear();
        finish(exchange);
      },
    };
    if (text !== null) {
      const turn = make("div", "turn user");
      turn.append(make("div", "who", "you"));
      turn.append(make("div", "bubble", text));
      if (context) turn.append(make("div", "context-note", `context ${JSON.stringify(context)}`));
      exchange.userMeta = make("div", "meta");
      exchange.userMeta.append(make("span", "badge pending", "sending…"));
      turn.append(exchange.userMeta);
      node.append(turn);
    }
    state.exchanges.set(id, exchange);
    state.pending.push(exchange);
    append(node);
    setControls();
    return exchange;
  }

  function newBubble(exchange, name) {
    const node = make("div", "turn agent");
    node.dataset.agent = name;
    node.dataset.state = "waiting";
    node.style.setProperty("--agent-color", agentColor(name));
    node.setAttribute("aria-label", `reply from ${name}`);
    const who = make("div", "who", name);
    const bubble = make("div", "bubble");
    const typing = make("span", "typing");
    typing.append(make("span"), make("span"), make("span"), make("span", "visually-hidden", `${name} is thinking`));
    const text = make("div", "text");
    bubble.append(typing, text);
    // The reply so far, re-rendered at most once per animation frame however fast chunks come
    // (a hidden tab renders nothing until it is shown again, or the reply ends). A long reply
    // costs more to render each time: then the renders are spaced out, leaving the page at
    // least three quarters of its time (docs/playground.md has the numbers).
    let raw = "";
    let scheduled = false;
    let cost = 0; // milliseconds the last render took
    const render = () => {
      scheduled = false;
      const started = performance.now();
      let rendered = null;
      try {
        rendered = renderMarkdown && renderMarkdown(raw);
      } catch (err) {
        rendered = null; // a reply the renderer chokes on still shows, as plain text
      }
      if (rendered) {
        text.classList.add("md");
        text.replaceChildren(rendered);
        addCopyButtons(text);
      } else {
        text.classList.remove("md");
        text.textContent = raw;
      }
      cost = performance.now() - started;
      follow();
    };
    const renderSoon = () => {
      if (scheduled) return;
      scheduled = true;
      // render() may run first (the reply ended): then this one has nothing left to do.
      const next = () => requestAnimationFrame(() => scheduled && render());
      if (cost > 8) setTimeout(next, cost * 3);
      else next();
    };
    const meta = make("div", "meta");
    node.append(who, bubble, meta);
    // Tool calls and the progress line sit above the reply's text, outside its Markdown.
    let tools = null; // the list of this reply's tool calls, made with the first one
    const calls = new Map(); // call_id -> its <details>
    let status = null; // the progress line: the next event, the text or the end replaces it
    const clearStatus = () => {
      if (status) status.remove();
      status = null;
    };
    const json = (value) => {
      try {
        return JSON.stringify(value, null, 2) ?? "null";
      } catch (err) {
        return String(value);
      }
    };
    const section = (label, value, className) => {
      const part = make("div", `tool-part ${className}`);
      const pre = make("pre", "tool-json");
      pre.append(make("code", "", json(value)));
      part.append(make("div", "tool-label", label), pre);
      return part;
    };
    const toolFor = (frame) => {
      const id = String(frame.call_id);
      let details = calls.get(id);
      if (details) return details;
      if (!tools) {
        tools = make("div", "tools");
        bubble.insertBefore(tools, status || text);
      }
      details = make("details", "tool");
      details.dataset.callId = id;
      details.dataset.state = "running";
      const summary = make("summary", "tool-summary");
      summary.append(make("span", "tool-name", String(frame.name ?? "tool")), make("span", "tool-state", "running…"));
      details.append(summary);
      tools.append(details);
      calls.set(id, details);
      return details;
    };

    const b = {
      node,
      finished: false,
      start() {
        if (b.finished) return;
        typing.remove();
        node.dataset.state = "streaming";
        node.setAttribute("aria-busy", "true");
      },
      chunk(piece) {
        if (b.finished || typeof piece !== "string") return;
        b.start();
        clearStatus();
        raw += piece;
        renderSoon();
      },
      toolCall(frame) {
        if (b.finished) return;
        b.start();
        clearStatus();
        const details = toolFor(frame);
        if (!details.querySelector(".tool-args")) {
          details.insertBefore(section("arguments", frame.arguments ?? {}, "tool-args"), details.querySelector(".tool-result"));
        }
        follow();
      },
      toolResult(frame) {
        if (b.finished) return;
        b.start();
        clearStatus();
        const details = toolFor(frame);
        const failed = frame.is_error === true;
        details.querySelector(".tool-result")?.remove();
        details.append(section(failed ? "error" : "result", frame.result ?? null, "tool-result"));
        details.dataset.state = failed ? "error" : "done";
        details.querySelector(".tool-state").textContent = failed ? "error" : "done";
        follow();
      },
      progress(frame) {
        if (b.finished) return;
        b.start();
        clearStatus();
        const stage = typeof frame.stage === "string" ? frame.stage : "working";
        const detail = typeof frame.detail === "string" ? `: ${frame.detail}` : "";
        status = make("div", "progress-line", `${stage}…${detail}`);
        status.setAttribute("role", "status");
        bubble.insertBefore(status, text);
        follow();
      },
      end(full, usage, reason) {
        typing.remove();
        clearStatus();
        if (typeof full === "string") raw = full;
        render();
        b.finished = true;
        node.removeAttribute("aria-busy");
        const finish = reason || "stop";
        node.dataset.state = finish === "stop" ? "done" : finish;
        meta.replaceChildren(make("span", `badge ${finish}`, finish));
        meta.firstChild.title = "finish_reason";
        if (usage && typeof usage === "object") {
          const prompt = usage.prompt_tokens ?? 0;
          const out = usage.candidates_tokens ?? 0;
          const tokens = make("span", "tokens", `tokens: ${prompt} prompt · ${out} candidates`);
          tokens.title = "token_usage";
          meta.append(tokens);
        }
        announce(`${name}: ${raw.slice(0, 300)}${finish === "stop" ? "" : ` (${finish})`}`);
        b.settle();
      },
      fail(frame) {
        typing.remove();
        clearStatus();
        render();
        b.finished = true;
        node.removeAttribute("aria-busy");
        node.dataset.state = "error";
        bubble.insertBefore(make("span", "error-text", describeError(frame)), text);
        meta.replaceChildren(make("span", "badge error", frame.code));
        b.settle();
      },
      interrupt(reason) {
        if (b.finished) return;
        typing.remove();
        clearStatus();
        render();
        b.finished = true;
        node.removeAttribute("aria-busy");
        node.dataset.state = reason;
        meta.replaceChildren(make("span", `badge ${reason}`, reason));
      },
      settle() {
        if (exchange.expected.length && [...exchange.expected].every((n) => exchange.bubbles.get(n)?.finished)) {
          finish(exchange);
        } else if (!exchange.expected.length && [...exchange.bubbles.values()].every((x) => x.finished)) {
          finish(exchange);
        }
        follow();
      },
    };
    if (!exchange.expected.includes(name)) exchange.expected = [...exchange.expected, name];
    exchange.bubbles.set(name, b);
    exchange.node.append(node);
    follow();
    return b;
  }

  function finish(exchange) {
    if (exchange.done) return;
    exchange.done = true;
    state.pending = state.pending.filter((x) => x !== exchange);
    setControls();
  }

  function interruptPending(reason, which = () => true) {
    const keep = state.pending.filter((exchange) => !which(exchange));
    for (const exchange of state.pending.filter(which)) {
      for (const bubble of exchange.bubbles.values()) bubble.interrupt(reason);
      if (!exchange.acked && exchange.userMeta) {
        exchange.userMeta.replaceChildren(make("span", "badge interrupted", "not sent"));
      }
      exchange.done = true;
    }
    state.pending = keep;
  }

  // ------------------------------------------------------- sending and stopping

  function readContext() {
    const raw = el.context.value.trim();
    el.contextError.textContent = "";
    el.context.removeAttribute("aria-invalid");
    if (!raw) return { ok: true, value: undefined };
    let value;
    try {
      value = JSON.parse(raw);
    } catch (err) {
      return { ok: false, error: `Context is not valid JSON: ${err.message}` };
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      return { ok: false, error: "Context must be a JSON object, like {\"location\": \"New York\"}." };
    }
    return { ok: true, value };
  }

  function send() {
    const ws = state.ws;
    if (!ws || !state.connected || ws.readyState !== WebSocket.OPEN) return;
    const text = el.message.value;
    if (!text.trim()) return;
    const context = readContext();
    if (!context.ok) {
      el.contextError.textContent = context.error;
      el.context.setAttribute("aria-invalid", "true");
      document.getElementById("extras").open = true;
      el.context.focus();
      return;
    }
    state.counter += 1;
    const id = `msg-${String(state.counter).padStart(3, "0")}`;
    const payload = { message: text };
    if (context.value !== undefined) payload.context = context.value;
    const agent = el.agent.value;
    if (agent) payload.agent = agent;
    const expected = agent ? [agent] : [...((state.info && state.info.agents) || [])];
    ws.send(JSON.stringify({ type: "message", id, payload }));
    newExchange(id, text, expected, context.value);
    el.message.value = "";
    autosize();
    scrollDown();
  }

  function stop() {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    state.pending.forEach((exchange, index) => {
      if (exchange.cancelRequested) return;
      exchange.cancelRequested = true;
      ws.send(JSON.stringify({ type: "cancel", id: exchange.id }));
      const started = [...exchange.bubbles.values()].some((b) => b.node.dataset.state !== "waiting");
      if (started) return; // its agents answer with finish_reason "cancelled"
      // A queued message is dropped without a reply; the oldest may be just starting, so wait a moment.
      const drop = () => {
        if (exchange.done || [...exchange.bubbles.values()].some((b) => b.node.dataset.state !== "waiting")) return;
        for (const bubble of exchange.bubbles.values()) bubble.interrupt("cancelled");
        if (exchange.userMeta) exchange.userMeta.append(make("span", "badge cancelled", "cancelled before any reply"));
        finish(exchange);
      };
      if (index === 0) setTimeout(drop, 1500);
      else drop();
    });
  }

  function autosize() {
    el.message.style.height = "auto";
    el.message.style.height = `${Math.min(el.message.scrollHeight + 2, 200)}px`;
  }

  // ------------------------------------------------------- wiring

  el.connectForm.addEventListener("submit", (event) => {
    event.preventDefault();
    connect();
  });
  el.reconnect.addEventListener("click", connect);
  el.disconnect.addEventListener("click", () => {
    state.userClosed = true;
    disconnect();
  });
  el.connector.addEventListener("change", () => {
    showConnectorUrl();
    setControls();
  });
  // Back online: try at once instead of waiting out the backoff.
  window.addEventListener("online", () => {
    if (state.retry !== null) scheduleReconnect(0);
  });
  el.reveal.addEventListener("click", () => {
    const show = el.secret.type === "password";
    el.secret.type = show ? "text" : "password";
    el.reveal.textContent = show ? "Hide" : "Show";
    el.reveal.setAttribute("aria-pressed", String(show));
  });
  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  el.message.addEventListener("keydown", (event) => {
    // Enter sends, Shift+Enter is a new line; never while an input method is composing.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  el.message.addEventListener("input", autosize);
  el.context.addEventListener("input", () => {
    el.contextError.textContent = "";
    el.context.removeAttribute("aria-invalid");
  });
  el.stop.addEventListener("click", stop);
  el.connectionToggle.addEventListener("click", () => setCollapsed(el.connection.dataset.collapsed !== "true"));
  el.log.addEventListener("click", (event) => {
    const button = event.target.closest("button.copy");
    if (button) onCopy(button);
  });
  el.log.addEventListener("scroll", () => {
    stick = nearBottom();
  });
  // The composer grows (autosize, the context panel): keep the newest text in view.
  new ResizeObserver(follow).observe(el.log);

  function pickConnector(wanted) {
    for (const option of el.connector.options) if (option.dataset.path === wanted) option.selected = true;
  }

  // The banner's link: the page's URL with #secret=... (or #connect for a connector without auth).
  // A fragment never reaches the server, a proxy or a log. The page takes it, removes it from the
  // address bar (so it is not bookmarked or shared by accident) and connects by itself.
  // Returns whether the fragment asked to connect.
  function readFragment() {
    const fragment = new URLSearchParams(window.location.hash.slice(1));
    if (!["secret", "connect", "connector"].some((key) => fragment.has(key))) return false;
    if (fragment.has("connector")) pickConnector(fragment.get("connector"));
    if (fragment.has("secret")) el.secret.value = fragment.get("secret");
    history.replaceState(history.state, "", window.location.pathname + window.location.search);
    showConnectorUrl();
    return fragment.has("secret") || fragment.has("connect");
  }

  function connectFromFragment() {
    // A link pasted into a connected tab fills the form but does not end the session it has.
    if (readFragment() && !state.connected && selectedConnector()) connect();
  }

  const params = new URLSearchParams(window.location.search);
  if (params.has("secret")) el.secret.value = params.get("secret");
  if (params.has("connector")) pickConnector(params.get("connector"));
  showConnectorUrl();
  showSummary();
  setCollapsed(false);
  setControls();
  if (config.connectors.length === 0) setStatus("closed", "No connector");
  (el.secret.value ? el.connect : el.secret).focus();
  window.addEventListener("hashchange", connectFromFragment);
  connectFromFragment();
})();
