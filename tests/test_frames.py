"""Every server frame's JSON is PROTOCOL.md's object for it, the hand-written per-turn frames included."""

from __future__ import annotations

import json
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st

from connic.frames import (
    Ack,
    Connected,
    ErrorFrame,
    Pong,
    Response,
    ServerFrame,
    StreamChunk,
    StreamEnd,
    StreamStart,
    encode,
)

# Any text, lone surrogates and control characters included: the fast path must escape like json.
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
ids = st.one_of(texts, st.integers(-(2**63), 2**63 - 1))
usages = st.one_of(
    st.fixed_dictionaries({"prompt_tokens": st.integers(0, 2**40), "candidates_tokens": st.integers(0, 2**40)}),
    st.dictionaries(texts, st.integers(), max_size=3),
)
hand_encoded = st.one_of(
    st.builds(Ack, id=ids, message_number=st.integers(1, 10_000), agent=st.none() | texts),
    st.builds(StreamStart, id=ids, agent=texts),
    st.builds(StreamChunk, id=ids, agent=texts, chunk=texts),
    st.builds(StreamEnd, id=ids, agent=texts, full_response=texts, token_usage=usages, finish_reason=texts),
    st.builds(Response, id=ids, agent=texts, response=texts, token_usage=usages, finish_reason=texts),
)
frames = st.one_of(
    hand_encoded,
    st.builds(ErrorFrame, id=st.none() | ids, code=texts, message=texts, agent=st.none() | texts),
    st.builds(
        Connected,
        session_id=texts,
        agents=st.tuples(texts),
        streaming=st.booleans(),
        max_messages=st.integers(0, 10_000),
        session_timeout=st.floats(0, 1e6),
        resume_token=st.none() | texts,
        last_seq=st.none() | st.integers(0, 2**63 - 1),
    ),
    st.just(Pong()),
)


def wire_object(frame: ServerFrame) -> dict[str, Any]:
    """PROTOCOL.md's form of a frame: its type, then its fields in order (the per-turn frames),
    or its ``to_dict()`` (the frames with members that are not fields, or left out when unset)."""
    if isinstance(frame, Ack):  # its agent only when the message named one
        return {"type": frame.type, **attrs.asdict(frame, filter=lambda field, value: value is not None)}
    if isinstance(frame, StreamStart | StreamChunk | StreamEnd | Response):
        return {"type": frame.type, **attrs.asdict(frame)}
    return frame.to_dict()


def reference(frame: ServerFrame) -> str:
    return json.dumps(wire_object(frame), ensure_ascii=False, separators=(",", ":"))


@given(frame=frames)
def test_encode_matches_json(frame: ServerFrame) -> None:
    assert encode(frame) == reference(frame)


@given(frame=hand_encoded)
def test_to_dict_is_the_wire_object(frame: ServerFrame) -> None:
    assert frame.to_dict() == wire_object(frame)


def test_encode_round_trips() -> None:
    frame = Response(
        id="m-1", agent="echo", response='say "hi"\n\u2028é', token_usage={"prompt_tokens": 2, "candidates_tokens": 3}
    )
    decoded: dict[str, Any] = json.loads(encode(frame))
    assert decoded == {
        "type": "response",
        "id": "m-1",
        "agent": "echo",
        "response": 'say "hi"\n\u2028é',
        "token_usage": {"prompt_tokens": 2, "candidates_tokens": 3},
        "finish_reason": "stop",
    }
