"""Two cancels of one id while a second message with that id is held on the follower.

As tests/test_review5.py: the session answers m1 on process A, the client resumes on B, which
follows A's reply and holds what the client sends meanwhile; the same frames go to one process
(the ``memory`` store). There the second m1 is queued behind the first, and the two cancels
stop the first in flight and then the second: on one process it begins as the first is
stopped (so it is stopped in flight, its stream_start sent), where the follower drops it as
it admits it (its ack only); neither runs to its end, nor does a cancel answer not_found.
"""

from __future__ import annotations

from typing import Any

from redis_server import redis_server_fixture  # noqa: F401  (a fixture)
from resume_helpers import Clients, clients_fixture  # noqa: F401  (a fixture)
from test_redis_held import launch  # noqa: F401  (a fixture)
from test_review5 import _run


async def test_two_cancels_of_an_id_held_behind_the_owners_reply_with_it_cancel_both(
    launch: Any,  # noqa: F811  (the fixture imported above)
    clients: Clients,
) -> None:
    # PROTOCOL.md §5: a cancel stops the message in flight with its id before it drops a queued
    # one. The follower passed the first cancel to the owner, which stopped its m1, and the held
    # m1 was let go with it: the second cancel went to the owner too, which had no m1 left
    # (not_found), and the held m1 ran to its end.
    for shared in (False, True):
        a = await launch("max_queued = 1", shared=shared)
        b = await launch("max_queued = 1") if shared else a
        frames, _ = await _run(a, b, clients, [], ["m1", "-m1", "-m1"])
        ends = {key[3]: n for key, n in frames.items() if key[:2] == ("stream_end", "m1")}
        assert frames[("error", "m1", None, None, "not_found")] == 0, (shared, frames)
        assert frames[("ack", "m1", 2, None, None)] == 1 and "stop" not in ends, (shared, frames)
        assert ends["cancelled"] >= 1, (shared, frames)
