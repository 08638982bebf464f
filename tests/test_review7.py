"""Review 7: held cancels on a follower (process B) against one process, cases the heldm1 tests left out.

As tests/test_held_cancels.py (the fixtures of tests/test_review5.py): the session answers m1
on process A, the client resumes on B, which follows A's reply and holds what it sends meanwhile;
the same frames go to one process (the ``memory`` store).
"""

from __future__ import annotations

from typing import Any

from redis_server import redis_server_fixture  # noqa: F401  (a fixture)
from resume_helpers import Clients, clients_fixture  # noqa: F401  (a fixture)
from test_redis_held import launch  # noqa: F401  (a fixture)
from test_review5 import _run


async def test_a_second_cancel_behind_a_held_message_after_a_cancel_passed_at_once_drops_it(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
) -> None:
    # PROTOCOL.md §5: the first cancel stops m1 in flight; the second finds it stopped already and
    # drops the m1 queued behind it (or stops it, had it begun): the second m1 never runs to its end.
    for shared in (False, True):
        a = await launch(shared=shared)
        b = await launch() if shared else a
        frames, _ = await _run(a, b, clients, [], ["-m1", "m1", "-m1"])
        ends = {key[3]: n for key, n in frames.items() if key[:2] == ("stream_end", "m1")}
        assert frames[("error", "m1", None, None, "not_found")] == 0, (shared, frames)
        assert frames[("ack", "m1", 2, None, None)] == 1 and "stop" not in ends, (shared, frames)
