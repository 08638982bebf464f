"""The hand-written JSON of the per-turn frames is exactly what ``json`` makes of their dicts."""

from __future__ import annotations

import json
from typing import Any

import pytest
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
    _loads,
    encode,
    encode_ack,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
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


padded = st.builds(lambda v, pad: pad + json.dumps(v) + pad, json_values, st.sampled_from([" ", "\n", "\t "]))


@given(text=st.one_of(st.text(max_size=30), st.builds(json.dumps, json_values), padded))
def test_loads_is_json_loads(text: str) -> None:
    try:
        expected: Any = json.loads(text)
    except ValueError as exc:
        with pytest.raises(ValueError) as raised:
            _loads(text)
        assert type(raised.value) is type(exc) and str(raised.value) == str(exc)
    else:
        assert json.dumps(_loads(text)) == json.dumps(expected)  # NaN compares unequal to itself


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
