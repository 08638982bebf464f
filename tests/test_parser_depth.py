"""Deeply nested frames: bounded by MAX_DEPTH, refused as ``invalid_json`` (docs/protocol.md).

json's parser recurses once per level, so a frame like ``"[" * 100000`` used to raise
RecursionError through the parser: the session was lost (after auth) or closed 1000
with a traceback in the log (before auth).
"""

from __future__ import annotations

import json
import logging
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SECRET, Connect
from connic.errors import InvalidJSON
from connic.frames import MAX_DEPTH, MessageFrame, parse_client_frame

DEEP = "[" * 100_000 + "]" * 100_000
# Before authentication frames are bounded by max_auth_frame_bytes (16 KiB): deep, but small.
DEEP_SMALL = "[" * 5_000 + "]" * 5_000


def nested(depth: int) -> str:
    """A valid message whose context makes the whole frame ``depth`` levels deep."""
    inner = '{"a":' * (depth - 1) + "1" + "}" * (depth - 1)
    return '{"message":"deep","context":' + inner + "}"


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    "text",
    [DEEP, "[" * 100_000, '{"a":' * 50_000, "[{" * (MAX_DEPTH // 2 + 1)],
    ids=["balanced", "unclosed", "objects", "just-over"],
)
async def test_deep_frame_after_auth_is_invalid_json_and_the_session_goes_on(
    server, connect: Connect, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    caplog.set_level(logging.INFO)
    client = await connect(server.url())
    await client.send(text)
    error = await client.recv()
    assert error["type"] == "error" and error["code"] == "invalid_json" and error["id"] is None, error
    assert str(MAX_DEPTH) in error["message"] or "not valid JSON" in error["message"]
    frames = await client.reply({"id": "after", "message": "still here"})
    assert frames[-1]["type"] == "stream_end" and frames[-1]["full_response"] == "still here", frames
    assert frames[0] == {"type": "ack", "id": "after", "message_number": 1}
    no_tracebacks(caplog)


async def test_frames_up_to_max_depth_are_answered(server, connect: Connect) -> None:
    client = await connect(server.url())
    frames = await client.reply(nested(MAX_DEPTH))
    assert frames[-1]["type"] == "stream_end" and frames[-1]["full_response"] == "deep", frames
    error = (await client.reply(nested(MAX_DEPTH + 1)))[-1]
    assert error["code"] == "invalid_json" and str(MAX_DEPTH) in error["message"], error


@pytest.mark.parametrize("text", [DEEP_SMALL, '{"secret":' + DEEP_SMALL + "}"], ids=["array", "in-auth-frame"])
async def test_deep_frame_before_auth_closes_4001_without_a_traceback(
    server, connect: Connect, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    caplog.set_level(logging.INFO)
    client = await connect(server.url(), secret=None, expect_connected=False)
    await client.send(text)
    code, frames = await client.closed()
    assert code == 4001, (code, frames)
    assert [f["code"] for f in frames] == ["unauthorized"]
    no_tracebacks(caplog)
    # The server is fine: the next client authenticates and is answered.
    other = await connect(server.url(), secret=SECRET)
    assert (await other.reply({"message": "ok"}))[-1]["full_response"] == "ok"


# --- the bound itself, against a reference depth ---------------------------------------


def depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


# Strings full of brackets, quotes and backslashes: the bound must count only real nesting.
tricky = st.text(alphabet='[]{}"\\ab\n', max_size=6)
values = st.recursive(
    st.none() | st.integers() | tricky,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky, inner, max_size=3),
    max_leaves=40,
)


def wrap(value: object, levels: int, rng: random.Random) -> object:
    for _ in range(levels):
        value = [value] if rng.random() < 0.5 else {'"[{': value}
    return value


@settings(max_examples=300, deadline=None, database=None)
@given(values, st.integers(min_value=0, max_value=2 * MAX_DEPTH), st.randoms(use_true_random=False))
def test_the_bound_is_exact_outside_strings(value: object, levels: int, rng: random.Random) -> None:
    frame = {"message": "m", "context": {"v": wrap(value, levels, rng)}}
    text = json.dumps(frame, separators=(",", ":"))
    if depth(frame) <= MAX_DEPTH:
        parsed = parse_client_frame(text)
        assert isinstance(parsed, MessageFrame) and parsed.context == frame["context"]
    else:
        with pytest.raises(InvalidJSON, match=str(MAX_DEPTH)):
            parse_client_frame(text)


@pytest.mark.parametrize(
    "text",
    [
        '"' + "[" * 1000,  # an unterminated string full of brackets
        "]" + "[" * 1000,  # closes first
        '["\\"' + "[" * 1000,  # an escaped quote, then an unterminated string
        "[" * 1000 + '"',
    ],
    ids=["unterminated-string", "closes-first", "escaped-quote", "quote-last"],
)
def test_broken_frames_with_many_brackets_are_invalid_json(text: str) -> None:
    with pytest.raises(InvalidJSON):
        parse_client_frame(text)
