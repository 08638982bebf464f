"""Keeping secrets out of logs and error responses, including aiohttp's own.

connic itself never logs a secret, but aiohttp does log request lines: a
malformed request (``GET /ws?secret=S x HTTP/1.1``) is logged at ERROR with a
traceback that quotes the raw line, and echoed in the 400 body; its access log
(on under gunicorn, or when an embedding application turns it on) writes every
request line with its query string. :func:`install_log_redaction` puts a
:class:`RedactingFilter` on aiohttp's and gunicorn's loggers; :func:`hide_bad_request_echo`
makes an application answer malformed requests with a fixed 400 body.

connic's own errors and logs name things configured with secrets in them: :func:`safe_url`
and :func:`safe_command` give a URL and a command line (an MCP server's) fit for them, and
:func:`scrub` a line a child process wrote. They are in :mod:`connic.redact_command`, and
importable from here too.
"""

from __future__ import annotations

import functools
import logging
import re
import traceback
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import ERROR as PARSE_ERROR_MESSAGE

# Importable from here as they always were (connic.agents.mcp_config, the Redis store, docs/mcp.md).
from connic.redact_command import REDACTED, SCRUB_MIN, command_secrets, safe_command, safe_url, scrub, secret_name

__all__ = [
    "REDACTED",
    "SCRUB_MIN",
    "RedactingFilter",
    "hide_bad_request_echo",
    "install_log_redaction",
    "command_secrets",
    "redact",
    "safe_command",
    "safe_url",
    "scrub",
    "secret_name",
]

SECRET_NAMES = frozenset({"secret", "x-connic-secret"})
"""The query parameters and header that carry a secret, lower-cased (connic.transports.websocket)."""

LOGGERS = (
    "aiohttp.server",
    "aiohttp.access",
    "aiohttp.web",
    "aiohttp.websocket",
    "aiohttp.internal",
    "gunicorn.error",  # aiohttp's gunicorn worker logs through gunicorn's loggers
    "gunicorn.access",
)
"""Loggers that may see a request line or headers. A filter on a logger does not see its children's records."""

BAD_REQUEST_BODY = "400 Bad Request: malformed HTTP request\n"

# name=value in a query string (also inside a quoted request line): the name is checked
# after percent-decoding, as aiohttp decodes it before connic looks it up. At most 64
# characters of name (the secret's, percent-encoded throughout, are 45): unbounded, a long
# run of name characters that ends in no "=" made every position in it scan to its end, and
# a malformed request line of 8 KB (logged through this) held the event loop for 0.2 s.
_PARAM = re.compile(r"""(?P<name>[^\s?&;=#'"/]{1,64})=(?P<value>[^\s&;#'"]*)""")
# The header, as a raw line, in a repr or in a dict: everything after it on the line goes.
_HEADER = re.compile(r"""(?i)(x-connic-secret['"]?\s*:\s*)[^\r\n]+""")
# A JSON or repr'd "secret": "value" (an auth frame quoted in an error).
_JSON = re.compile(r"""(?i)(["']secret["']\s*:\s*)(["'])(?:\\.|(?!\2).)*\2""")
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _param(match: re.Match[str]) -> str:
    if match.group("value") and unquote_plus(match.group("name")).lower() in SECRET_NAMES:
        return f"{match.group('name')}={REDACTED}"
    return match.group(0)


def redact(text: str) -> str:
    """``text`` with every secret it carries as a query parameter, header or JSON field replaced."""
    if "=" in text:
        text = _PARAM.sub(_param, text)
    lowered = text.lower()
    if "x-connic-secret" in lowered:
        text = _HEADER.sub(rf"\1{REDACTED}", text)
    if "secret" in lowered:
        text = _JSON.sub(rf"\1\2{REDACTED}\2", text)
    return text


def _reason(exc: BaseException) -> str:
    """What was wrong with a malformed request, without any of its bytes: ``BadStatusLine: Bad status line``."""
    lines = str(getattr(exc, "message", "") or "").strip().splitlines()
    # aiohttp's message starts with a description and then quotes the offending bytes
    # ("Invalid header token:\n\n  b'...'", or "Bad status line 'GET ...'"): keep what comes before.
    first = re.split(r"""['"]|\bb'""", lines[0], maxsplit=1)[0].rstrip(" :") if lines else ""
    first = redact(first)
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class RedactingFilter(logging.Filter):
    """Rewrites records so that no secret survives: message, traceback text and ``extra`` fields.

    A malformed HTTP request (aiohttp's ``HttpProcessingError``) becomes one WARNING
    line naming the problem, with no traceback and none of the request's bytes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return self._rewrite(record)
        except Exception:
            # A filter that raises breaks the caller (aiohttp would answer 500): withhold the record instead.
            record.msg = "a log record was withheld: it could not be checked for secrets"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            return True

    def _rewrite(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            # The client's mistake, not the server's: no traceback, nothing of what it sent.
            said = redact(record.getMessage())
            record.msg = "%s: malformed HTTP request (%s)"
            record.args = (said, _reason(exc))
            record.exc_info = None
            record.exc_text = None
            # At most a warning (aiohttp logs some, such as non-HTTP bytes, at DEBUG: those stay).
            level = min(record.levelno, logging.WARNING)
            record.levelno = level
            record.levelname = logging.getLevelName(level)
            return logging.getLogger(record.name).isEnabledFor(level)
        message = record.getMessage()
        redacted = redact(message)
        for name, value in list(vars(record).items()):
            if name in _STANDARD:
                continue
            if isinstance(value, str):
                setattr(record, name, redact(value))
            elif isinstance(value, dict):  # aiohttp's access log: {"request_header": {name: value}}
                for key, item in list(value.items()):
                    if isinstance(key, str) and key.lower() in SECRET_NAMES and item:
                        if isinstance(item, str) and item != "-":
                            redacted = redacted.replace(item, REDACTED)
                        value[key] = REDACTED
                    elif isinstance(item, str):
                        value[key] = redact(item)
        if redacted != message:
            record.msg = redacted
            record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            if redact(text) != text:
                record.exc_text = redact(text)
        return True


_FILTER = RedactingFilter()


def install_log_redaction() -> None:
    """Put the redacting filter on aiohttp's and gunicorn's loggers (once per process)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(_FILTER)


class _Request(web.Request):
    """aiohttp's request, but a malformed one's 400 answer does not quote what was sent."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        # aiohttp answers a request it could not parse through a stand-in request made
        # from its ERROR message, with the parser's description (and the raw line) as body.
        if self._message is PARSE_ERROR_MESSAGE and response.status == 400 and isinstance(response, web.Response):
            response.text = BAD_REQUEST_BODY
            # aiohttp has already counted the old body (this hook runs inside its _start).
            response.headers[hdrs.CONTENT_LENGTH] = str(len(BAD_REQUEST_BODY.encode()))
        await super()._prepare_hook(response)


def hide_bad_request_echo(app: web.Application) -> None:
    """Make ``app`` (the one a runner serves) answer malformed requests with a fixed 400 body.

    aiohttp builds every request, the stand-in for a malformed one included, with
    the application's ``_make_request``; this has it build connic's :class:`_Request`.
    If a future aiohttp changes that, nothing breaks: the body is aiohttp's again.
    """
    make: Any = getattr(app, "_make_request", None)
    if make is not None:
        setattr(app, "_make_request", functools.partial(make, _cls=_Request))  # noqa: B010
