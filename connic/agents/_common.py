"""Helpers shared by the built-in LLM agents: masking the API key, naming failures, retry delays."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator

from connic.errors import AgentError

__all__ = ["MASK", "backoff", "is_timeout", "mask", "unexpected"]

MASK = "***"


def mask(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``***``.

    Providers quote the key they were sent in some error bodies ("API key not valid:
    sk-... was rejected"); what reaches a client or a log must never carry it.
    """
    return text.replace(secret, MASK) if secret else text


def is_timeout(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it wraps, is a timeout.

    The HTTP stacks under the SDKs each have their own timeout classes (``TimeoutError``,
    requests' ``ReadTimeout``, urllib3's ``ReadTimeoutError``, httpx's ``ReadTimeout``), and
    requests wraps a read timeout in the middle of a body in a ``ConnectionError``; looking
    through the chain by class name avoids importing every one of them. The name of the class
    itself, not of its bases: urllib3's ``NewConnectionError`` (a refused connection) derives
    from ``ConnectTimeoutError``.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, TimeoutError) or "Timeout" in type(current).__name__:
            return True
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
    return False


def backoff(first: float = 1.0, factor: float = 2.0, cap: float = 8.0) -> Iterator[float]:
    """Delays between retries: ``first``, then ``factor`` times longer each time, at most ``cap``."""
    delay = first
    while True:
        yield delay
        delay = min(delay * factor, cap)


def unexpected(exc: BaseException, secret: str | None, log: logging.Logger, agent: str) -> AgentError:
    """An ``AgentError`` for an exception the agent did not expect, logged with its traceback.

    The pipeline would log and report it too, but unmasked: the message and the traceback
    could quote the key.
    """
    text = mask("".join(traceback.format_exception(exc)).rstrip(), secret)
    log.error("agent %s failed unexpectedly: %s", agent, text)
    return AgentError(mask(f"agent {agent!r} failed: {type(exc).__name__}: {exc}", secret))
