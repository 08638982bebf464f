"""Reading a run's request: the body, bounded, parsed into a ``RunAgentInput`` and a connic message.

Every refusal is one line naming what is wrong: 413 for a body over
``max_body_bytes``, 408 for one not all there within ``body_timeout``, 400 for a
body that is not UTF-8 JSON (or nests too deep), 422 for a ``RunAgentInput``
that does not validate (the field named as ``ag-ui-protocol`` reports it) or
that connic cannot run.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

from connic.frames import MAX_DEPTH, MessageFrame, too_deep

if TYPE_CHECKING:
    from ag_ui.core import RunAgentInput

__all__ = ["read_run"]

Refusal = tuple[int, str]


async def read_run(
    request: web.Request, max_bytes: int, within: float, agent: str | None
) -> tuple[Refusal | None, RunAgentInput | None, MessageFrame | None]:
    """The run a request asks for, and its message; or the status and line refusing it.

    The body must arrive within ``within`` seconds: a client that stops sending it (or
    declares more than it sends) would hold its connection, and what it sent, for ever.
    """
    from ag_ui.core import RunAgentInput
    from pydantic import ValidationError

    from connic.transports.agui_events import BadInput, message_of

    length = request.content_length
    if length is not None and length > max_bytes:
        return (413, f"the body is {length} bytes; this connector takes at most {max_bytes}"), None, None
    body = bytearray()
    try:
        async with asyncio.timeout(within):
            async for chunk in request.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    return (413, f"the body is over {max_bytes} bytes, this connector's limit"), None, None
    except TimeoutError:
        return (408, f"the body did not arrive within {within:g} s"), None, None
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return (400, "the body is not UTF-8 text"), None, None
    if text.count("[") + text.count("{") > MAX_DEPTH and too_deep(text):
        return (400, f"the body nests arrays and objects deeper than {MAX_DEPTH} levels"), None, None
    try:
        run = RunAgentInput.model_validate_json(text)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0] if errors else None
        if first is None or first.get("type") == "json_invalid":
            return (400, "the body is not valid JSON"), None, None
        field = ".".join(str(part) for part in first["loc"]) or "body"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return (422, f"RunAgentInput.{field}: {first['msg']}{more}"), None, None
    try:
        frame = message_of(run, agent)
    except BadInput as exc:
        return (422, f"RunAgentInput.{exc}"), None, None
    return None, run, frame
