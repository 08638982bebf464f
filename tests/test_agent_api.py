"""The agent-facing types: the history view agents read, and history entries' wire form."""

from __future__ import annotations

import attrs
import pytest

from connic.agent import HistoryEntry, HistoryView, Session, Turn


def test_history_view_is_a_prefix_that_later_entries_do_not_change() -> None:
    entries = [HistoryEntry("user", "hi", None, "m1", 1), HistoryEntry("agent", "hello", "echo", "m1", 1)]
    view = HistoryView(entries)
    entries.append(HistoryEntry("user", "later", None, "m2", 2))
    assert len(view) == 2
    assert list(view) == entries[:2]
    assert view[-1] is entries[1]
    assert view[:1] == (entries[0],)
    with pytest.raises(IndexError):
        view[2]


def test_history_entry_wire_form() -> None:
    entry = HistoryEntry("agent", "hello", "echo", "m1", 3)
    assert entry.to_dict() == {"role": "agent", "text": "hello", "id": "m1", "message_number": 3, "agent": "echo"}
    assert HistoryEntry("user", "hi").to_dict()["agent"] is None


def test_turns_are_frozen_and_evolve() -> None:
    turn = Turn("m1", 1, "hello", {}, (), Session("s", HistoryView([]), {}), "echo", True)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        turn.message = "changed"  # type: ignore[misc]
    changed = attrs.evolve(turn, message="changed")
    assert changed.message == "changed"
    assert changed.session is turn.session
