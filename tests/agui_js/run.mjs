// Runs the official AG-UI HttpAgent against a URL and prints what it saw, one JSON object a line.
// Usage: node run.mjs '<spec JSON>'; spec = {url, headers, threadId, turns: [text, ...], agentMessages}
//   {"event": {...}}     every event, after the SDK's own validation (verifyEvents)
//   {"done": {...}}      after each turn: the run's result and the agent's messages so far
//   {"error": "..."}     a turn the SDK refused or that failed (the script then stops, exit 0)
import { HttpAgent } from "@ag-ui/client";

const spec = JSON.parse(process.argv[2]);
const print = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const agent = new HttpAgent({ url: spec.url, headers: spec.headers ?? {}, threadId: spec.threadId });
if (spec.messages) agent.messages = spec.messages;
let n = 0;
for (const text of spec.turns) {
  n += 1;
  agent.addMessage({ id: `user-${n}-${Date.now()}`, role: "user", content: text });
  try {
    const result = await agent.runAgent({}, { onEvent: ({ event }) => { print({ event }); } });
    print({ done: { result, messages: agent.messages, threadId: agent.threadId } });
  } catch (err) {
    print({ error: String(err && err.message ? err.message : err) });
    break;
  }
}
