"""AG-UI's WebSocket binding resuming a thread: ``{"type": "resume", "threadId": T, "lastSeq": N}``.

Part of :class:`~connic.transports.agui_ws.WSBinding`, kept in its own module for size (as
:mod:`~connic.transports.ws_resume` is for the Connic protocol's connection): the functions
here act for the binding and use its internals as its own methods would. :func:`resume`
checks the frame and finds the thread; the binding's ``_take`` then replays its log and goes live.

With a shared store, a thread the resume finds live on no connection of this process is
looked up with a follow (:meth:`Threads.thread <connic.transports.agui_threads.Threads.thread>`):
while another process still serves it, that process's frames come here as it logs them, from
the start of the thread's log, and each run's events are rebuilt from them. Those up to the
client's ``lastSeq`` are not sent again, but they tell each run where it is (a text message
already open, a step under way); the rest go out as they come, then, once that process lets
the thread go (its runs over) or dies (its lease runs out: each reply it left unfinished
ends with ``producer_lost``), the thread is taken over here and goes live. The socket is read
meanwhile: its end stops following, a ``cancel`` of a run that process answers or queues is
passed to it (a queued one is dropped here at once, as one process drops it), and every other
frame is held and handled afterwards, in order. A cancel of a run not known yet (sent before
the first frames came, or before any frame of it after ``lastSeq``) is held, and looked at again
with each batch followed: passed once that process's frames name the run. At most twice
``max_queued`` frames and a few are held (as on the Connic protocol, ws_bound.py); past that each
is answered at once, ``RUN_ERROR`` ``queue_full`` (no ``seq``). A newer resume of the thread takes this one
over (``session_taken_over``), as the Connic protocol's does.

Rebuilding the runs' events needs the log from the thread's first frame (``replay_buffer``
frames). When it no longer has it, the thread is followed from the oldest frame it holds
(frames up to ``lastSeq`` again not sent), as a resume on one process then replays from
there: a run begun before is taken up where those frames say it is (a text message open
goes on, not started again). Only when even the frames after ``lastSeq`` are gone is it
followed from ``lastSeq`` (PROTOCOL.md §7: an ``invalid_resume`` first).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import WSMessage, WSMsgType, web

from connic.errors import InvalidResume, QueueFull, SessionTakenOver, StoreUnavailable
from connic.session import ChatSession
from connic.transports.agui_outbox import shown
from connic.transports.agui_ws import oldest_before
from connic.transports.ws_bound import SLACK

if TYPE_CHECKING:
    from connic.sessions import Sessions
    from connic.stores import Follow
    from connic.transports.agui_ws import WSBinding

__all__ = ["resume"]

log = logging.getLogger("connic.agui")

_ENDED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)  # the socket is over


async def resume(binding: WSBinding, data: dict[str, Any]) -> None:
    """A ``resume`` frame: the thread it names taken, its events after ``lastSeq`` sent, then live ones."""
    from connic.transports.agui_events import THREAD_ID

    thread_id, last_seq = data.get("threadId"), data.get("lastSeq")
    if binding.session is not None:
        binding._error(InvalidResume("resume must be the first frame of a connection"))
        return
    peer = binding.request.remote or "unknown"
    if binding.transport.throttle.retry_after(peer) is not None:
        # Braked: no thread is looked at, so that ids and tokens cannot be tried meanwhile.
        binding._error(InvalidResume("too many failed authentications from your address; resume later"))
        return
    if not isinstance(thread_id, str) or isinstance(last_seq, bool) or not isinstance(last_seq, int):
        _failed(binding, InvalidResume("resume needs a string threadId and an integer lastSeq"), peer)
        return
    if THREAD_ID.fullmatch(thread_id) is None:
        _failed(binding, InvalidResume(f"threadId {shown(thread_id)} is not a thread id"), peer)
        return
    token = data.get("resumeToken")
    given = token if isinstance(token, str) else None
    store = binding.transport.store
    if store.durable and await store.get(thread_id) is None:
        # Another process may be serving it: the resume follows its runs in flight meanwhile.
        await _following(binding, thread_id, given, last_seq, peer)
        return
    found = await binding.transport.threads.thread(thread_id, given, peer, create=False)
    await _resumed(binding, found, thread_id, last_seq, peer)


async def _resumed(
    binding: WSBinding,
    found: tuple[ChatSession, bool] | web.Response | None,
    thread_id: str,
    last_seq: int,
    peer: str,
    *,
    followed: int | None = None,
) -> None:
    """Go on with a resume once the thread it names is looked up (``found``: what ``Threads.thread`` gave).

    ``followed``: the seq a resume following another process had the log to (the binding's ``_take``).
    """
    if isinstance(found, web.Response):
        # A wrong token was counted where it was compared; other refusals count here.
        if found.status != 403:
            binding.transport.throttle.failed(peer)
        binding.metrics.resumes.inc(binding.label, "failed")
        binding._error(InvalidResume(f"thread {thread_id!r} cannot be resumed from {last_seq}"))
        return
    if found is None or last_seq > found[0].seq or last_seq < 0:
        binding.runs.clear()  # what a resume following another process rebuilt
        if found is not None:
            found[0].resume_failed()  # it may have been taken over from the store for this resume
        # Not a thread connic knows (nothing is opened for it), or not that far.
        _failed(binding, InvalidResume(f"thread {thread_id!r} cannot be resumed from {last_seq}"), peer)
        return
    binding.session = found[0]
    await binding._take(found[0], last_seq, followed=followed)


def _failed(binding: WSBinding, error: InvalidResume, peer: str) -> None:
    """A resume that fails counts as a failed authentication (PROTOCOL.md §7)."""
    binding.transport.throttle.failed(peer)
    binding.metrics.resumes.inc(binding.label, "failed")
    binding._error(error)


class _Followed:
    """The frames another process logs for the thread, turned into the binding's events as they come."""

    __slots__ = (
        "after",
        "binding",
        "blind",
        "capacity",
        "cursor",
        "last_seq",
        "newest",
        "thread_id",
        "waiting",
        "went_blind",
    )

    def __init__(
        self,
        binding: WSBinding,
        thread_id: str,
        last_seq: int,
        after: int,
        waiting: dict[str, list[WSMessage]] | None = None,
    ) -> None:
        self.binding = binding
        self.thread_id = thread_id
        self.last_seq = last_seq  # the client's: the frames up to it are not sent again
        # The log is read after it: 0 (the runs' events rebuilt), its oldest frame held, or last_seq.
        self.after = after
        self.capacity = 0  # the thread's replay_buffer, once following
        self.newest = 0  # the newest seq logged, when the log had lost the frames after ``after``
        self.cursor: int | None = None  # the seq of the newest frame handed here, once following
        # The log no longer holds the thread's first frame: the runs' events cannot be rebuilt.
        self.blind = False
        self.went_blind: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # runId -> the held cancels of a run the log followed did not name (yet): _early passes
        # them once it does. Keyed, so that each batch costs a look-up per run, not a parse per frame held.
        self.waiting: dict[str, list[WSMessage]] = waiting if waiting is not None else {}

    def of(self, owner: Sessions) -> Follow:
        """The follow callback for a thread of ``owner``'s connector (whose agents its runs have)."""
        binding = self.binding
        agents = (binding.agent,) if binding.agent is not None else owner.agent_names
        binding.following = (self.thread_id, agents)
        self.capacity = owner.options.replay_buffer
        return self.frames

    def frames(self, frames: list[str] | None, last: int) -> None:
        """A batch of logged frames, the newest numbered ``last`` (the first batch: the log after ``after``)."""
        if self.blind:
            return
        binding = self.binding
        if frames is None:  # only ever the first batch: later, the store gives up rather than skip one
            if self.after < self.last_seq:
                self.blind = True  # followed again from further on (_following)
                self.newest = last
                self.went_blind.set_result(None)
                return
            # Even the frames after the client's last_seq are gone: said as a resume on one process
            # says it; the runs go on with the frames logged from now on.
            binding._error(InvalidResume(f"the thread's log no longer holds every event after {self.last_seq}"))
            self._at(last)
            return
        for seq, data in enumerate(frames, last - len(frames) + 1):
            binding._translate(data, silent=seq <= self.last_seq)
        self._at(last)

    def _at(self, last: int) -> None:
        self.cursor = last
        if self.waiting:
            # The cancels held for a run not known then (sent before the follow began, or before
            # a frame of that run was followed) go to that process now, if it is one of its runs.
            _early(self.binding, self)


async def _following(binding: WSBinding, thread_id: str, given: str | None, last_seq: int, peer: str) -> None:
    """Resume ``thread_id`` from ``last_seq``, following the process that serves it meanwhile, if one does.

    ``given`` is the resume token the client sent; ``peer`` its address (the
    failed-authentication brake). The binding's ``session`` is set once the thread is taken.
    """
    if last_seq < 0:
        _failed(binding, InvalidResume(f"thread {thread_id!r} cannot be resumed from {last_seq}"), peer)
        return
    threads = binding.transport.threads

    def find(followed: _Followed) -> asyncio.Future[tuple[ChatSession, bool] | web.Response | None]:
        return asyncio.ensure_future(
            threads.thread(thread_id, given, peer, create=False, follow=followed.of, after=followed.after)
        )

    followed = _Followed(binding, thread_id, last_seq, 0)
    task = find(followed)
    try:
        while not task.done():
            waiting: set[asyncio.Future[Any]] = {task, binding.receiving()}
            if not followed.went_blind.done():
                waiting.add(followed.went_blind)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            msg = binding.received()
            if msg is not None and _meanwhile(binding, followed, msg):
                _abandon(binding, task)  # the client is gone: the thread stays where it is
                return
            if followed.blind and not task.done():
                # The log no longer holds the thread's first frame, which rebuilding the runs'
                # events needs: followed from its oldest frame held instead, at once, as a resume
                # on one process whose log lost the thread's start replays from there. That frame
                # is the next one evicted: should it go before it is read, from the oldest held
                # then, which is later each time (the gap says newest - capacity > after), until
                # that is the client's last_seq.
                _abandon(binding, task)
                after = max(oldest_before(followed.newest, followed.capacity, last_seq), followed.after + 1)
                followed = _Followed(binding, thread_id, last_seq, after, followed.waiting)
                task = find(followed)
    except BaseException:
        # The handler is cancelled (shutdown): a thread the find took over in this very step is let go.
        task.add_done_callback(_let_go)
        task.cancel()
        raise
    try:
        found = task.result()
    except SessionTakenOver as exc:
        # A newer resume (elsewhere, or on this process) took the thread over while this one followed.
        binding.following = None
        binding.end(exc, True)
        return
    except StoreUnavailable as exc:
        binding.following = None
        binding.runs.clear()
        log.warning("thread %s: the session store failed: %s", thread_id, exc.why)
        binding._error(exc)
        return
    binding.following = None
    cursor = followed.cursor if not followed.blind else None
    if cursor is not None and found is None:
        # Following means the token was right: the thread ended there, or its log moved past
        # what could be followed (never a gap). The client may resume again from what it got.
        binding.runs.clear()
        binding.metrics.resumes.inc(binding.label, "failed")
        binding._error(InvalidResume(f"the process serving thread {thread_id!r} did not let it go; resume again"))
        return
    if cursor is None or not isinstance(found, tuple):
        binding.runs.clear()  # nothing was followed: a resume as before following
    await _resumed(binding, found, thread_id, last_seq, peer, followed=cursor)


def _meanwhile(binding: WSBinding, followed: _Followed, msg: WSMessage) -> bool:
    """A message the client sent while the resume follows another process; whether the socket ended."""
    if msg.type in _ENDED:
        binding.held.append(msg)  # the binding's reader ends with it
        return True
    run_id = _cancelled(msg)
    if run_id is None or not _passed(binding, followed, run_id):
        held = len(binding.held)
        if held >= 2 * binding.transport.options.max_queued + SLACK:
            # Held to a bound, as the Connic protocol's resume holds (ws_bound.py): a client
            # flooding frames through a long run elsewhere would grow this process without limit.
            # More runs than one process would queue: it refuses them too (queue_full).
            binding._error(QueueFull(f"{held} frames are held while another process answers this thread"))
            return False
        binding.held.append(msg)
        if run_id is not None:
            followed.waiting.setdefault(run_id, []).append(msg)
    return False


def _early(binding: WSBinding, followed: _Followed) -> None:
    """Frames were followed: the cancels held for runs not known then are looked at again.

    A client may send its cancel right behind its resume, before the first frames came: held
    till the thread was taken over, it stopped the run only after its natural end, where on
    one process it stops it at once. Those of a run that process has go there now.
    """
    for run_id in [run_id for run_id in followed.waiting if run_id in binding.runs]:
        if _passed(binding, followed, run_id):
            for msg in followed.waiting.pop(run_id):  # one pass answers each cancel of it
                with contextlib.suppress(ValueError):  # read already: the resume is over
                    binding.held.remove(msg)


def _passed(binding: WSBinding, followed: _Followed, run_id: str) -> bool:
    """Whether a cancel of ``run_id``, a run the process serving the thread has, was passed to it (else it is held)."""
    run = binding.runs.get(run_id)
    if run is None or run.done or followed.cursor is None:
        return False  # not a run that process has (as far as the log followed says)
    # Passed to that process at once (or, should it let the thread go first, to the process
    # taking it over, which acts on it then): a run it answers (an agent's frame of it came)
    # is cancelled there, and its end comes back in the log, as on one process.
    binding.transport.store.cancel(followed.thread_id, run_id)
    if not run.answered:
        # Queued there: it drops it without a frame saying so, so it is dropped here at once, as
        # one process drops a queued run. Should it have begun meanwhile, it ends there cancelled,
        # and the frames of it still to come are not the client's (it was told the run is over).
        del binding.runs[run_id]
        binding.dropped.add(run_id)
        binding.urgent(binding._entries(run.dropped(), None))
    return True


def _cancelled(msg: WSMessage) -> str | None:
    """The ``runId`` a ``cancel`` frame names; None for any other message."""
    if msg.type is not WSMsgType.TEXT or '"cancel"' not in msg.data:
        return None
    try:
        data = json.loads(msg.data)
    except (ValueError, RecursionError):
        return None
    if isinstance(data, dict) and data.get("type") == "cancel" and isinstance(data.get("runId"), str):
        run_id: str = data["runId"]
        return run_id
    return None


def _abandon(binding: WSBinding, task: asyncio.Future[Any]) -> None:
    binding.following = None
    binding.runs.clear()
    task.add_done_callback(_let_go)
    task.cancel()


def _let_go(task: asyncio.Future[Any]) -> None:
    # What a find abandoned by its resume gives: a thread it took over (no connection attaches
    # to it, unless another resume of it is under way) goes on detached, as a dropped one does.
    if task.cancelled() or task.exception() is not None:
        return
    found = task.result()
    if isinstance(found, tuple) and isinstance(found[0], ChatSession) and not found[0].resuming:
        found[0].resume_failed()
