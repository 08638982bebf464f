"""The ``redis`` store's session record and history entries, as JSON.

The record holds the session's scalars; its history is a Redis list beside it, one
entry per item (:func:`encode_entry`), so that saving a session after an exchange
sends the entries it added, not the whole conversation again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs

from connic.agent import HistoryEntry
from connic.stores import SessionRecord
from connic.stores.redis.keys import sha1hex

__all__ = ["Listed", "decode", "encode", "encode_entry", "holding"]

_COMPACT = (",", ":")


def encode(record: SessionRecord) -> str:
    """The record's scalars as JSON: everything but its history (:func:`encode_entry`).

    ValueError or TypeError when an agent's state does not encode as JSON (a set, an object;
    nested deeper than JSON can encode): the session's write fails, not the others'.

    Not ASCII-escaped: the claim's Lua reads the record with cjson, which refuses the escape
    of a lone surrogate (``"\\ud800"``, which JSON lets a client send and an agent keep in its
    state): such a session could be resumed nowhere. Sent as UTF-8 with the surrogate kept
    (``surrogatepass``, as every argument to Redis is), it reaches cjson as bytes, which it
    takes as they are.
    """
    fields: dict[str, Any] = {
        "id": record.id,
        "label": record.label,
        "token": record.token,
        "seq": record.seq,
        "count": record.count,
        "limit_reached": record.limit_reached,
        "tokens_in": record.tokens_in,
        "tokens_out": record.tokens_out,
        "states": record.states,
        "history_size": record.history_size,
        "busy": record.busy,
        "last_active": record.last_active,
    }
    if record.pending is not None:
        fields["pending"] = record.pending
    if record.ended:
        fields["ended"] = sorted(record.ended)
    try:
        return json.dumps(fields, separators=_COMPACT, ensure_ascii=False)
    except RecursionError:
        # Raised past its callers' handling of a state that does not encode, it failed the
        # writer's whole batch: every session's frames and records, again at every batch after.
        raise ValueError("an agent's state is nested too deeply to encode as JSON") from None


def encode_entry(entry: HistoryEntry) -> str:
    """One history entry as a JSON array (an item of the session's history list)."""
    return json.dumps([entry.role, entry.text, entry.agent, entry.id, entry.message_number], separators=_COMPACT)


@attrs.frozen
class Listed:
    """What a session's history list in Redis holds, as this process last wrote or read it.

    A save appends to the list only while it still holds that (:data:`~connic.stores.redis.scripts.SAVE`):
    Redis restarted from an older snapshot, or a replica promoted behind its primary, holds an
    older list, and appending to it left a hole in the conversation.
    """

    newest: HistoryEntry | None = attrs.field(eq=False)
    """The newest entry (found by identity in the session's history: where the next save starts)."""
    count: int
    """How many items the list holds."""
    digest: str
    """The SHA-1 of its last item (:func:`~connic.stores.redis.keys.sha1hex`; '' when it is empty)."""


def holding(entries: Sequence[HistoryEntry]) -> Listed:
    """What a history list holding exactly ``entries`` holds."""
    if not entries:
        return Listed(None, 0, "")
    return Listed(entries[-1], len(entries), sha1hex(encode_entry(entries[-1])))


def decode(data: str, entries: Sequence[str]) -> tuple[SessionRecord, bool]:
    """The record :func:`encode` wrote with the history list's ``entries``; whether the history came from them.

    A record written before the history had a list of its own holds it inline (a
    ``"history"`` field): that one is used, and the list, which such a process never
    writes, is not in step with the session (False).
    """
    raw = json.loads(data)
    inline = raw.get("history")
    items = inline if inline is not None else [json.loads(entry) for entry in entries]
    pending = raw.get("pending")
    record = SessionRecord(
        id=raw["id"],
        label=raw["label"],
        token=raw["token"],
        seq=raw["seq"],
        count=raw["count"],
        limit_reached=raw["limit_reached"],
        tokens_in=raw["tokens_in"],
        tokens_out=raw["tokens_out"],
        states=raw["states"],
        history=tuple(HistoryEntry(*item) for item in items),
        history_size=raw["history_size"],
        busy=raw.get("busy", False),  # records written before it was kept
        last_active=raw.get("last_active"),  # the same
        pending=None if pending is None else tuple((m[0], m[1], m[2]) for m in pending),  # the same
        ended=frozenset(raw.get("ended", ())),  # the same
    )
    return record, inline is None
