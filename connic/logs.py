"""Logging set-up: plain text (the default) or one JSON object per line, with the ids of the turn.

:data:`TURN` holds the ids of the agent turn being answered (session, message,
connector, agent). connic sets it around every turn while JSON logs or telemetry
are on (:func:`connic.telemetry.answer`), in the task that runs the agent, so an
agent's own log lines, and those of any task it starts, carry the same ids.
:class:`JsonFormatter` writes them, with the trace id and span id of the current
OpenTelemetry span when one is active. It never imports OpenTelemetry: it reads
the current span only if something else (connic's telemetry, or the application)
already imported it.

Redaction (:mod:`connic.redact`) is a logger filter: it rewrites a record before
any handler formats it, so the JSON lines are as free of secrets as the text ones.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

import attrs

__all__ = ["FORMATS", "TURN", "JsonFormatter", "TurnIds", "configure_logging"]

FORMATS = ("text", "json")
"""The values of ``[server] log_format`` and ``--log-format``."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@attrs.frozen
class TurnIds:
    """The ids of one agent turn, as the JSON logs show them."""

    session_id: str
    message_id: str | int
    message_number: int
    connector: str
    agent: str


TURN: contextvars.ContextVar[TurnIds | None] = contextvars.ContextVar("connic_turn", default=None)
"""The turn being answered in this task (None outside a turn)."""

ids_wanted = False
"""Whether anything reads :data:`TURN`: set once a :class:`JsonFormatter` exists.

Checked once per turn, so that connic sets the ids only when something writes them.
"""


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line.

    Keys: ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``,
    ``message``; inside an agent turn ``session_id``, ``message_id``,
    ``message_number``, ``connector`` and ``agent``; with an active OpenTelemetry
    span ``trace_id`` and ``span_id`` (hex); ``exception`` (the formatted
    traceback) when the record has one; and any ``fields`` given here (a worker's
    number, say).
    """

    def __init__(self, fields: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.fields = dict(fields or {})
        global ids_wanted
        ids_wanted = True  # from now on connic sets TURN around every turn

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        seconds = time.gmtime(record.created)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", seconds) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(self.fields)
        turn = TURN.get()
        if turn is not None:
            out["session_id"] = turn.session_id
            out["message_id"] = turn.message_id
            out["message_number"] = turn.message_number
            out["connector"] = turn.connector
            out["agent"] = turn.agent
        trace = sys.modules.get("opentelemetry.trace")
        if trace is not None:
            # Only if it is loaded already: a log line must never be what imports OpenTelemetry.
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                out["trace_id"] = format(context.trace_id, "032x")
                out["span_id"] = format(context.span_id, "016x")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text  # redacted already when it quoted a secret (connic.redact)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str, *, text_format: str = TEXT_FORMAT, **fields: Any) -> None:
    """Set up the root logger for ``connic run`` (and its workers): ``level``, ``"text"`` or ``"json"``.

    ``text_format`` is the text lines' format; ``fields`` are added to every JSON line.
    """
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(fields) if log_format == "json" else logging.Formatter(text_format))
    logging.basicConfig(level=level, handlers=[handler])
