"""The memory store's replay log against the plain model of it: the last ``capacity`` frames, in order."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

from connic.stores.memory import BLOCK, MemoryReplayLog

TEXTS = ["", "é", "\ud800", "ab", '{"type":"stream_chunk","chunk":"tok "}']


@pytest.mark.parametrize("capacity", [1, 2, 3, 5, 64])
def test_the_log_holds_the_last_frames_through_evictions_and_compactions(capacity: int) -> None:
    log = MemoryReplayLog(capacity)
    model: deque[tuple[int, str]] = deque(maxlen=capacity)
    for seq in range(1, 4 * capacity + 20):
        frame = f'{{"seq":{seq},"x":"{TEXTS[seq % len(TEXTS)]}"}}'
        log.append(seq, frame)
        model.append((seq, frame))
        for after in range(max(0, seq - capacity - 2), seq + 1):
            expected = [f for s, f in model if s > after] if after + 1 >= model[0][0] else None
            assert asyncio.run(log.since(after)) == expected, (seq, after)
        held, size = log.stats()
        assert held == len(model)
        assert size == sum(len(f.encode("utf-8", "surrogatepass")) for _, f in model)


def test_a_log_starts_at_the_first_frame_it_is_given() -> None:
    log = MemoryReplayLog(8)
    log.append(41, "a")  # a session restored at seq 40: its log starts there
    assert asyncio.run(log.since(40)) == ["a"]
    assert asyncio.run(log.since(39)) is None
    assert asyncio.run(log.since(41)) == []


@pytest.mark.parametrize("capacity", [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
def test_sealed_blocks_and_their_eviction_keep_exactly_the_last_frames(capacity: int) -> None:
    # Past BLOCK frames the log seals them into blocks, and drops a block once every frame in it
    # is older than the newest `capacity`: around those edges it still holds exactly those.
    async def check() -> None:
        log = MemoryReplayLog(capacity)
        model: deque[tuple[int, str]] = deque(maxlen=capacity)
        for seq in range(1, 4 * BLOCK + 2 * capacity + 5):
            frame = f'{{"seq":{seq},"x":"{TEXTS[seq % len(TEXTS)]}"}}'
            log.append(seq, frame)
            model.append((seq, frame))
            if seq % 5 and seq % BLOCK not in (0, 1, BLOCK - 1):
                continue
            for after in range(max(0, seq - capacity - 2), seq + 1):
                expected = [f for s, f in model if s > after] if after + 1 >= model[0][0] else None
                assert await log.since(after) == expected, (seq, after)
            assert log.stats() == (len(model), sum(len(f.encode("utf-8", "surrogatepass")) for _, f in model))

    asyncio.run(check())
