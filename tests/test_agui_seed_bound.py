"""A new thread's history from the run's earlier messages is held to ``max_history_bytes`` as any
thread's is: the oldest entries go first, and the agent never sees more than the bound."""

from __future__ import annotations

import json

from test_agui_support import agui_config, agui_registry, post_run, run_input, text_of

from conftest import StartServer

BOUND = 1000


async def test_a_seeded_history_over_max_history_bytes_keeps_its_newest_entries(start_server: StartServer) -> None:
    config = agui_config({"max_history_bytes": BOUND}, {"look": {"use": "inspect"}})
    server = await start_server(config, registry=agui_registry())
    before = [
        {"id": f"m{n}", "role": "user" if n % 2 == 0 else "assistant", "content": f"{n:03}" + "x" * 97}
        for n in range(20)  # 2,000 bytes of text
    ]
    status, events = await post_run(server.http + "/agui", run_input("t-seed-big", "now", before=before))
    assert status == 200 and isinstance(events, list), events
    history = json.loads(text_of(events))["history"]
    texts = [h["text"] for h in history if h["text"] != "now"]
    assert sum(len(text) for text in texts) <= BOUND, [t[:3] for t in texts]
    assert texts == [m["content"] for m in before[-len(texts) :]]  # the newest ones
    assert len(texts) == BOUND // 100
