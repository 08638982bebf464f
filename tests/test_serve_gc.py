"""The served process's garbage collector: start-up frozen, young collections at connic's threshold.

Seen from inside a ``python -m connic run`` process, through an agent that answers with
what the collector is set to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT, SECRET, CliServer, Connect
from connic.cli import GC_YOUNG_THRESHOLD

GC_AGENT = '''
import gc
import json

import connic


class Collector(connic.Agent):
    """Answers with the collector's thresholds and how many objects are frozen."""

    async def respond(self, turn):
        yield json.dumps({"thresholds": gc.get_threshold(), "frozen": gc.get_freeze_count()})
'''


async def test_a_served_process_collects_young_objects_at_connics_threshold(
    tmp_path: Path, cli: Callable[..., CliServer], connect: Connect
) -> None:
    (tmp_path / "gc_agent.py").write_text(GC_AGENT, encoding="utf-8")
    config = tmp_path / "connic.toml"
    config.write_text(
        f'[agents.gc]\nuse = "gc_agent:Collector"\n\n[[connectors]]\npath = "/ws"\nsecrets = ["{SECRET}"]\n',
        encoding="utf-8",
    )
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH") or str(ROOT)) if p)
    server = cli("--config", str(config), env={"PYTHONPATH": path})
    client = await connect(server.url)
    frames = await client.reply({"message": "gc?"})
    seen = json.loads(frames[-1]["full_response"])
    assert seen["thresholds"] == [GC_YOUNG_THRESHOLD, 10, 10]  # CPython's own for the older generations
    assert GC_YOUNG_THRESHOLD > 700  # CPython's default, which S7 measured at several times the cost
    assert seen["frozen"] > 0  # what start-up made is left out of every collection
