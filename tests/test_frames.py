"""The hand-written JSON of the per-turn frames is exactly what ``json`` makes of their dicts."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from connic.frames import (
    Ack,
    ErrorFrame,
    Response,
    ServerFrame,
    StreamChunk,
    StreamEnd,
    StreamStart,
    encode,
    encode_ack,
)

# Any text, lone surrogates and control characters included: the fast path must escape like json.
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
ids = st.one_of(texts, st.integers(-(2**63), 2**63 - 1))
usages = st.one_of(
    st.fixed_dictionaries({"prompt_tokens": st.integers(0, 2**40), "candidates_tokens": st.integers(0, 2**40)}),
    st.dictionaries(texts, st.integers(), max_size=3),
)
frames = st.one_of(
    st.builds(Ack, id=ids, message_number=st.integers(1, 10_000)),
    st.builds(StreamStart, id=ids, agent=texts),
    st.builds(StreamChunk, id=ids, agent=texts, chunk=texts),
    st.builds(StreamEnd, id=ids, agent=texts, full_response=texts, token_usage=usages, finish_reason=texts),
    st.builds(Response, id=ids, agent=texts, response=texts, token_usage=usages, finish_reason=texts),
    st.builds(ErrorFrame, id=st.none() | ids, code=texts, message=texts, agent=st.none() | texts),
)


def reference(frame: ServerFrame) -> str:
    return json.dumps(frame.to_dict(), ensure_ascii=False, separators=(",", ":"))


@given(frame=frames)
def test_encode_matches_json(frame: ServerFrame) -> None:
    assert encode(frame) == reference(frame)


@given(message_id=ids, number=st.integers(1, 10_000))
def test_encode_ack_is_encode_of_the_frame(message_id: str | int, number: int) -> None:
    assert encode_ack(message_id, number) == encode(Ack(message_id, number)) == reference(Ack(message_id, number))


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
