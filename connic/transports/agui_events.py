"""AG-UI for the ``agui`` transport: a run's input in, its connic frames out as AG-UI events.

:func:`message_of` turns a ``RunAgentInput`` into the connic message it asks
for (and the history a new thread starts with); :class:`RunEvents` follows the
session's frames of that message and says which AG-UI events they are. Both
use the official ``ag-ui-protocol`` models, imported lazily by
:mod:`connic.transports.agui` (the ``connic[agui]`` extra).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ag_ui.core import (
    AssistantMessage,
    AudioPart,
    BaseEvent,
    DataSource,
    DocumentPart,
    ImagePart,
    RunAgentInput,
    RunErrorEvent,
    RunFinishedCancelledOutcome,
    RunFinishedEvent,
    RunStartedEvent,
    StepFinishedEvent,
    StepStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    TextPart,
    TokenUsage,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
    UserMessage,
    VideoPart,
)

from connic.agent import File, HistoryEntry
from connic.frames import MAX_ID_LENGTH, MessageFrame

__all__ = ["THREAD_ID", "BadInput", "RunEvents", "message_of", "seed_of"]

_MEDIA = (ImagePart, AudioPart, VideoPart, DocumentPart)


class BadInput(ValueError):
    """A RunAgentInput connic cannot run: ``field`` names the part at fault (the 422's message)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


# A thread id becomes a session id, which names keys in a shared store (and shows in logs):
# letters, digits and a few marks only (a UUID, what AG-UI clients send, fits).
THREAD_ID = re.compile(rf"[A-Za-z0-9._:~-]{{1,{MAX_ID_LENGTH}}}")


def check_id(value: str, field: str) -> None:
    """A run id connic can use as a message id: 1 to 256 printable characters."""
    if not value or len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise BadInput(field, f"must be 1 to {MAX_ID_LENGTH} printable characters")


def message_of(run: RunAgentInput, agent: str | None) -> MessageFrame:
    """The connic message a run asks to answer: the last of ``messages``, which must be the user's."""
    if THREAD_ID.fullmatch(run.thread_id) is None:
        raise BadInput("threadId", f"must be 1 to {MAX_ID_LENGTH} letters, digits or . _ : ~ -")
    check_id(run.run_id, "runId")
    if not run.messages:
        raise BadInput("messages", "a run needs at least one message, the user's last")
    index = len(run.messages) - 1
    last = run.messages[index]
    if not isinstance(last, UserMessage):
        raise BadInput(f"messages.{index}.role", f"the last message must be the user's, not {last.role!r}")
    text, files = _content(last.content, f"messages.{index}.content")
    for earlier, message in enumerate(run.messages[:-1]):
        # Checked now, not when a new thread's history is seeded from them: a bad one is the
        # client's 422, before any session is opened for the run.
        if isinstance(message, UserMessage):
            _content(message.content, f"messages.{earlier}.content")
    context: dict[str, Any] = {
        "agui": {
            "thread_id": run.thread_id,
            "run_id": run.run_id,
            "message_id": last.id,
            "state": run.state,
            "context": [{"description": c.description, "value": c.value} for c in run.context or ()],
            "forwarded_props": run.forwarded_props,
        }
    }
    return MessageFrame(run.run_id, text, context, files, agent)


def seed_of(run: RunAgentInput, agents: Sequence[str]) -> list[HistoryEntry]:
    """The history a new thread starts with: the user and assistant texts before the last message.

    Only for a thread connic does not know yet; a known thread's stored history wins.
    """
    entries: list[HistoryEntry] = []
    for index, message in enumerate(run.messages[:-1]):
        if isinstance(message, UserMessage):
            text, _ = _content(message.content, f"messages.{index}.content")
            entries.append(HistoryEntry("user", text, None, message.id))
        elif isinstance(message, AssistantMessage) and message.content:
            name = message.name if message.name in agents else agents[0]
            entries.append(HistoryEntry("agent", message.content, name, message.id))
    return entries


def _content(content: str | Sequence[Any], field: str) -> tuple[str, tuple[File, ...]]:
    if isinstance(content, str):
        return content, ()
    texts: list[str] = []
    files: list[File] = []
    for index, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, _MEDIA) and isinstance(part.source, DataSource):
            try:
                data = base64.b64decode(part.source.value, validate=True)
            except (binascii.Error, ValueError):
                raise BadInput(f"{field}.{index}.source.value", "is not valid base64") from None
            files.append(File(name=part.id or f"part-{index}", mime_type=part.source.mime_type, data=data))
        else:
            raise BadInput(f"{field}.{index}", "only text parts and media parts with a data source are supported")
    return "\n".join(texts), tuple(files)


class RunEvents:
    """One run: the AG-UI events of its message's connic frames, in order.

    A text message opens with the first text of an agent and closes at a tool call
    (AG-UI clients want one thing streaming at a time), at the agent's end, or at
    an error. A ``progress`` stage is a step, open until the agent's next stage,
    its first text or its end. The run finishes once every agent answering the
    message has ended.
    """

    __slots__ = (
        "_error",
        "_open",
        "_parts",
        "_steps",
        "_usage",
        "agents",
        "announce",
        "announced",
        "answered",
        "cancelled",
        "done",
        "message_id",
        "run_id",
        "thread_id",
    )

    def __init__(self, thread_id: str, run_id: str, agents: Sequence[str], *, announce: bool = False) -> None:
        self.thread_id = thread_id
        # announce: RUN_STARTED comes with the message's ack (or its refusal), and so carries its seq
        # (the WebSocket binding); else the transport sends it itself before the message is admitted.
        self.announce = announce
        self.announced = not announce
        self.run_id = run_id
        self.message_id = run_id  # the connic message's id
        self.agents = set(agents)  # still answering
        self.done = False
        self.answered = False  # an agent's frame came: the message is being answered (queued no more)
        self.cancelled = False
        self._open: dict[str, str] = {}  # agent -> the id of its text message being streamed
        self._parts: dict[str, int] = {}  # agent -> how many text messages it opened
        self._steps: dict[str, str] = {}  # agent -> its open step
        self._error: tuple[str, str] | None = None
        self._usage = [0, 0]  # prompt and candidates tokens of every agent

    def started(self) -> BaseEvent:
        """``RUN_STARTED``."""
        return RunStartedEvent(thread_id=self.thread_id, run_id=self.run_id)

    def frame(self, frame: Mapping[str, Any]) -> list[BaseEvent]:
        """The events of one connic frame (none for another message's frames or an ack)."""
        if self.done or frame.get("id") != self.message_id:
            return []
        kind = frame.get("type")
        agent: Any = frame.get("agent")  # a str, except on a refusal (an error naming no agent)
        out: list[BaseEvent] = []
        # An ack names the agent a connection's runs go to (not one answering yet): queued still.
        self.answered |= isinstance(agent, str) and kind != "ack"
        if not self.announced and (kind == "ack" or (kind == "error" and agent is None)):
            self.announced = True
            out.append(self.started())
        if kind == "stream_chunk":
            self._text(agent, frame["chunk"], out)
        elif kind in ("stream_end", "response"):
            if kind == "response":
                self._text(agent, frame["response"], out)
            usage = frame.get("token_usage") or {}
            self._usage[0] += int(usage.get("prompt_tokens", 0))
            self._usage[1] += int(usage.get("candidates_tokens", 0))
            self.cancelled |= frame.get("finish_reason") == "cancelled"
            self._ended(agent, out)
        elif kind == "tool_call":
            self._close_text(agent, out)
            call_id = frame["call_id"]
            out.append(ToolCallStartEvent(tool_call_id=call_id, tool_call_name=frame["name"]))
            out.append(ToolCallArgsEvent(tool_call_id=call_id, delta=json.dumps(frame["arguments"])))
            out.append(ToolCallEndEvent(tool_call_id=call_id))
        elif kind == "tool_result":
            result = frame.get("result")
            content = result if isinstance(result, str) else json.dumps(result)
            out.append(
                ToolCallResultEvent(
                    message_id=f"{self.run_id}:{frame['call_id']}:result",
                    tool_call_id=frame["call_id"],
                    content=content,
                    role="tool",
                )
            )
        elif kind == "progress":
            self._close_step(agent, out)
            self._steps[agent] = str(frame["stage"])
            out.append(StepStartedEvent(step_name=str(frame["stage"])))
        elif kind == "error":
            if self._error is None:
                self._error = (str(frame["code"]), str(frame["message"]))
            if agent is None:
                self.agents.clear()  # refused: no agent answers it
                for name in list(self._open):
                    self._close_text(name, out)
            self._ended(agent, out)
        return out

    def failed(self, code: str, message: str) -> list[BaseEvent]:
        """The run ends early (the session ended, the server shuts down): its open parts, then ``RUN_ERROR``."""
        if self.done:
            return []
        out: list[BaseEvent] = []
        self._error = self._error or (code, message)
        for agent in list(self.agents):
            self._ended(agent, out)
        if not self.done:
            self.agents.clear()
            self._ended(None, out)
        return out

    def dropped(self) -> list[BaseEvent]:
        """The run was cancelled while queued: it starts (if it had not) and finishes, cancelled."""
        out: list[BaseEvent] = [] if self.announced else [self.started()]
        self.announced = True
        self.cancelled = True
        self.agents.clear()
        self._ended(None, out)
        return out

    def _text(self, agent: str, text: str, out: list[BaseEvent]) -> None:
        if not text:
            return  # AG-UI's content events must not be empty
        message_id = self._open.get(agent)
        if message_id is None:
            self._close_step(agent, out)  # the agent speaks: what it was doing is done
            part = self._parts[agent] = self._parts.get(agent, 0) + 1
            message_id = self._open[agent] = f"{self.run_id}:{agent}" + (f":{part}" if part > 1 else "")
            out.append(TextMessageStartEvent(message_id=message_id, role="assistant", name=agent))
        out.append(TextMessageContentEvent(message_id=message_id, delta=text))

    def _close_text(self, agent: str, out: list[BaseEvent]) -> None:
        message_id = self._open.pop(agent, None)
        if message_id is not None:
            out.append(TextMessageEndEvent(message_id=message_id))

    def _close_step(self, agent: str, out: list[BaseEvent]) -> None:
        step = self._steps.pop(agent, None)
        if step is not None:
            out.append(StepFinishedEvent(step_name=step))

    def _ended(self, agent: str | None, out: list[BaseEvent]) -> None:
        if agent is not None:
            self._close_text(agent, out)
            self._close_step(agent, out)
            self.agents.discard(agent)
        if self.agents:
            return
        self.done = True
        if self._error is not None:
            code, message = self._error
            out.append(RunErrorEvent(message=message, code=code))
            return
        usage = None
        if any(self._usage):
            usage = [TokenUsage(input_tokens=self._usage[0], output_tokens=self._usage[1])]
        outcome = RunFinishedCancelledOutcome() if self.cancelled else None
        out.append(RunFinishedEvent(thread_id=self.thread_id, run_id=self.run_id, usage=usage, outcome=outcome))
