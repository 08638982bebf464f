"""The ``redis`` store's session record, as JSON."""

from __future__ import annotations

import json

from connic.agent import HistoryEntry
from connic.stores import SessionRecord

__all__ = ["decode", "encode"]


def encode(record: SessionRecord) -> str:
    """The record as JSON (history entries as arrays: a long conversation costs less)."""
    return json.dumps(
        {
            "id": record.id,
            "label": record.label,
            "token": record.token,
            "seq": record.seq,
            "count": record.count,
            "limit_reached": record.limit_reached,
            "tokens_in": record.tokens_in,
            "tokens_out": record.tokens_out,
            "states": record.states,
            "history": [[e.role, e.text, e.agent, e.id, e.message_number] for e in record.history],
            "history_size": record.history_size,
            "busy": record.busy,
        },
        separators=(",", ":"),
    )


def decode(data: str) -> SessionRecord:
    """The record :func:`encode` wrote."""
    raw = json.loads(data)
    return SessionRecord(
        id=raw["id"],
        label=raw["label"],
        token=raw["token"],
        seq=raw["seq"],
        count=raw["count"],
        limit_reached=raw["limit_reached"],
        tokens_in=raw["tokens_in"],
        tokens_out=raw["tokens_out"],
        states=raw["states"],
        history=tuple(HistoryEntry(*entry) for entry in raw["history"]),
        history_size=raw["history_size"],
        busy=raw.get("busy", False),  # records written before it was kept
    )
