"""``python -m connic new NAME``: a starter agent and the configuration that serves it.

The two files are templates in this module (no package data to ship): ``NAME/agent.py``,
a small documented agent to edit, and ``NAME/connic.toml``, which serves it by file
reference (``use = "agent.py:Assistant"``), so nothing has to be packaged or installed.
"""

from __future__ import annotations

import re
from pathlib import Path

from connic.errors import ConfigError

__all__ = ["AGENT_PY", "CONNIC_TOML", "write_starter"]

AGENT_PY = '''\
"""A starter connic agent: edit respond() and restart the server.

Serve it with `python -m connic run --config connic.toml` (next to this file), or without a
configuration with `python -m connic run --agent agent.py:Assistant`.
The whole API is in connic's docs/writing-agents.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs

import connic


class Assistant(connic.Agent):
    """Greets the user, answers and remembers what was said in the session."""

    @attrs.frozen
    class Options:
        """The keys of this agent's [agents.NAME] table in connic.toml, with their defaults."""

        greeting: str = "Hello"

    options: Options

    async def respond(self, turn: connic.Turn) -> AsyncIterator[str | connic.Usage]:
        """Answer one message: yield text chunks (streamed to the client), then the token usage."""
        # turn.context is the JSON object the client sent as "context" with its message.
        name = turn.context.get("name", "there")
        # turn.session.history: the session's earlier messages ("user") and answers ("agent").
        earlier = [entry.text for entry in turn.session.history if entry.role == "user"]
        chunks = [f"{self.options.greeting}, {name}! ", f"You said: {turn.message}"]
        if earlier:
            chunks.append(f" (message {len(earlier) + 1}; before that: {earlier[-1]})")
        for chunk in chunks:
            yield chunk
        # Usage becomes the reply's token_usage; a model's agent reports its real counts.
        answer = "".join(chunks)
        yield connic.Usage(prompt_tokens=len(turn.message.split()), candidates_tokens=len(answer.split()))
'''

CONNIC_TOML = """\
# Serve the agent in agent.py: python -m connic run --config {config}
# Every key: connic's docs/configuration.md.

[agents.{agent}]
use = "agent.py:Assistant"   # FILE.py:CLASS, relative to this file
greeting = "Hello"           # Assistant.Options

[[connectors]]
path = "/ws"
# No secrets here: `connic run` generates one and prints it. Set your own for anything shared:
# secrets = ["change-me"]
"""

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+$")


def _agent_name(folder: Path) -> str:
    """The agent's name on the wire: the folder's name, lower-cased, if TOML takes it bare."""
    name = folder.resolve().name.lower()
    return name if _BARE_KEY.match(name) else "assistant"


def write_starter(folder: Path) -> tuple[Path, Path]:
    """Write ``folder/agent.py`` and ``folder/connic.toml``; refuse to overwrite either.

    Raises :class:`connic.ConfigError` (one line) when a file is already there or the
    folder cannot be made; nothing is written then.
    """
    agent, config = folder / "agent.py", folder / "connic.toml"
    for path in (agent, config):
        if path.exists() or path.is_symlink():
            raise ConfigError(f"new: {path} already exists; not overwriting it (choose another NAME)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"new: cannot create {folder}: {exc.strerror or exc}") from None
    try:
        # "x": a file that appeared since the check above is still not overwritten.
        with agent.open("x", encoding="utf-8") as f:
            f.write(AGENT_PY)
        with config.open("x", encoding="utf-8") as f:
            f.write(CONNIC_TOML.format(agent=_agent_name(folder), config=config.name))
    except OSError as exc:
        raise ConfigError(f"new: cannot write {exc.filename}: {exc.strerror or exc}") from None
    return agent, config
