"""What a follower counts when the owner's record it reads is newer than a cancel it passed (ws_ahead.Ahead).

The follower (process B) reads the owner's record once it holds a message or passes a cancel;
under load the owner (A) could take that cancel and save its record before B's read came back
(commit 4203729, seen in test_review5 under load): a record with the cancel applied, which a
cancel that dropped queued messages leaves no frame to tell. The cancels now reach A only once
the read came back (:class:`AfterRead`). These drive :class:`Ahead` deterministically (a
black-box run cannot make B's read come back after A's save on demand); each expected count is
what one process counts (PROTOCOL.md §5: ``max_queued`` counts the messages queued behind the
one answered when a message comes).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from connic.stores import SessionRecord
from connic.transports.ws_ahead import AfterRead, Ahead


class _Store:
    """A store whose record read comes back when the test says."""

    def __init__(self) -> None:
        self.record: asyncio.Future[SessionRecord | None] = asyncio.get_running_loop().create_future()
        self.cancels: list[tuple[str, bool]] = []  # passed to the owner: each one's id, held or not

    async def load(self, session_id: str) -> SessionRecord | None:
        return await self.record

    def cancel(self, session_id: str, message_id: str, *, held: bool = False) -> None:
        self.cancels.append((message_id, held))


def _record(seq: int, pending: list[tuple[str, int, str | None]], ended: frozenset[str] = frozenset()) -> SessionRecord:
    return SessionRecord(
        id="s",
        label="/ws",
        token=None,
        seq=seq,
        count=len(pending),
        limit_reached=False,
        tokens_in=0,
        tokens_out=0,
        states={},
        history=(),
        history_size=0,
        busy=bool(pending),
        pending=tuple(pending),
        ended=ended,
    )


def _frames(start: int, *frames: dict[str, Any]) -> list[str]:
    return [json.dumps({**frame, "seq": seq}) for seq, frame in enumerate(frames, start)]


def _end(message_id: str, agent: str, reason: str) -> dict[str, Any]:
    return {"type": "stream_end", "id": message_id, "agent": agent, "finish_reason": reason}


async def _read(ahead: Ahead, store: _Store, record: SessionRecord) -> None:
    store.record.set_result(record)
    assert ahead.loading is not None
    await asyncio.wait([ahead.loading])
    await asyncio.sleep(0)  # the read's done callback (Ahead._read)


async def test_frames_the_record_numbered_are_not_applied_to_it_again() -> None:
    # A answers m1 with a second m1 and m2 queued; B holds m3 and reads A's record. Meanwhile the
    # first m1 ends (stop) and the second begins, before A saves the record B reads (seq 11: the
    # second m1 first). One process: m3 and m4 each find the second m1 in flight and m2 queued.
    # Applied again, the first m1's end ended the second m1 too: m4 counted none queued.
    store, ahead = _Store(), Ahead(("assistant",))
    ahead.held()  # m3
    ahead.follows(store, "s")  # type: ignore[arg-type]
    ahead.seen(_frames(10, _end("m1", "assistant", "stop"), {"type": "stream_start", "id": "m1", "agent": "assistant"}))
    await _read(ahead, store, _record(11, [("m1", 2, None), ("m2", 3, None)]))
    ahead.held()  # m4
    assert [await ahead.count(), await ahead.count()] == [1, 1]


async def test_cancels_reach_the_owner_only_once_its_record_was_read_in_the_order_passed() -> None:
    # The record a newer cancel already changed cannot be told from an older one when the cancel
    # dropped queued messages (no frame says so): A answers m1 with m2 queued (max_queued 1); the
    # client sends m3 and m2 (held on B), then cancels m2 (held behind the held m2). One process:
    # m3 and m2 refused queue_full, the cancel drops A's m2 (no not_found). Given a record that
    # lists m1 alone (A dropped its m2 first), B counted none queued: so no cancel goes to A
    # before B's read of A's record came back (AfterRead).
    store, ahead = _Store(), Ahead(("assistant",))
    owner = AfterRead(ahead, store)  # type: ignore[arg-type]
    ahead.held()  # m3
    ahead.follows(store, "s")  # type: ignore[arg-type]
    ahead.held()  # m2
    ahead.passed("m2", "x")
    owner.cancel("s", "m2", held=True)
    ahead.passed("m9")
    owner.cancel("s", "m9")
    assert store.cancels == []
    await _read(ahead, store, _record(9, [("m1", 1, None), ("m2", 2, None)]))
    assert store.cancels == [("m2", True), ("m9", False)]
    assert [await ahead.count(), await ahead.count()] == [1, 1]
    assert "x" in ahead.took
    ahead.passed("m1")
    owner.cancel("s", "m1")  # read: at once
    assert store.cancels[-1] == ("m1", False)
