"""The agent-facing types: the transport's fast builders give the same objects as the classes."""

from __future__ import annotations

import attrs
import pytest

from connic.agent import File, HistoryView, Session, Turn, new_session, new_turn


def test_the_classes_have_nothing_the_fast_builders_would_skip() -> None:
    # new_turn and new_session set the slots directly: a validator, converter or
    # __attrs_post_init__ added to Turn or Session would not run for them.
    for cls in (Turn, Session):
        assert not hasattr(cls, "__attrs_post_init__")
        assert all(f.validator is None and f.converter is None for f in attrs.fields(cls))


def test_new_session_equals_the_class_built_one() -> None:
    history = HistoryView([("user", "hi", None), ("agent", "hello", "echo")])
    state = {"n": 1}
    fast = new_session("s-1", history, state)
    slow = Session("s-1", history, state)
    assert type(fast) is Session
    assert fast == slow
    assert [getattr(fast, f.name) for f in attrs.fields(Session)] == ["s-1", history, state]


def test_new_turn_equals_the_class_built_one_with_every_field_set() -> None:
    session = new_session("s-1", HistoryView([]), {})
    files = (File("a.txt", "text/plain", b"x"),)
    values = ("m1", 3, "hello", {"k": "v"}, files, session, "echo", False)
    fast = new_turn(*values)
    slow = Turn(*values)
    assert type(fast) is Turn
    assert fast == slow
    # Every field the class has is set, in the class's order: a field added to Turn
    # without a place in new_turn fails here.
    assert tuple(getattr(fast, f.name) for f in attrs.fields(Turn)) == values


def test_fast_built_objects_stay_frozen_and_evolve() -> None:
    turn = new_turn("m1", 1, "hello", {}, (), new_session("s", HistoryView([]), {}), "echo", True)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        turn.message = "changed"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        turn.session.id = "other"  # type: ignore[misc]
    changed = attrs.evolve(turn, message="changed")
    assert changed.message == "changed"
    assert changed.session is turn.session
    assert turn.message == "hello"
