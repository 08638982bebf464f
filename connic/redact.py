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
:func:`scrub` a line a child process wrote.
"""

from __future__ import annotations

import functools
import logging
import re
import shlex
import traceback
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import ERROR as PARSE_ERROR_MESSAGE

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

REDACTED = "[redacted]"
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


def safe_url(url: str) -> str:
    """``url`` fit for errors and logs: no credentials (``user:token@``), no query, no fragment.

    Tokens travel in all three (``https://host/mcp?api_key=...``); the scheme, host and path
    are enough to tell servers apart.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # "http://[::1/mcp": nothing can be told apart from what must be hidden
        return REDACTED
    netloc = parts.netloc
    if "@" not in netloc and not parts.query and not parts.fragment:
        return url  # nothing to hide (and ``unix:///path`` keeps its form)
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))


# What makes a name secret-bearing is its last word (see secret_name): one that ends like these...
_SECRET_ENDINGS = (
    "key",  # key, apikey, api-key, privatekey
    "token",  # token, accesstoken, auth_token (not "tokens", as in --max-tokens)
    "secret",
    "password",
    "passwd",
    "passphrase",
    "credential",
    "credentials",
    "authorization",
    "bearer",
    "cookie",
)
# ...or is one of these (whole words only: "author", "bypass" and "compat" are not secrets).
_SECRET_WORDS = frozenset({"auth", "pass", "pat"})
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_WORDS = re.compile(r"[-_.]+")
# An option of two or more letters, -name or --name (Go's flags take one dash); -k and the
# other one-letter flags are never taken as secret: -k, -p and -t mean too many things.
_OPTION = re.compile(r"-{1,2}(?P<name>[A-Za-z][\w.-]*[A-Za-z0-9])")
# NAME=value, --name=value, and the header forms "Name: value" and "Name:value".
_ASSIGNMENT = re.compile(r"(?P<name>-{0,2}[A-Za-z][\w.-]*)(?P<sep>=|[ \t]*:[ \t]*)(?P<value>.+)", re.DOTALL)
# A scheme is at most 32 characters: unbounded, a long run of "a.a.a..." before a "://" made
# every position in it scan to its end (quadratic), and scrub runs on the event loop.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{0,31}://\S+")
# Token prefixes of well-known services: OpenAI and Anthropic (sk-), Stripe (sk_, rk_), GitHub
# (ghp_ gho_ ghu_ ghs_ ghr_ github_pat_), GitLab (glpat-), Slack (xoxb- xoxp- ... xapp-),
# Google (AIza), Hugging Face (hf_), npm (npm_), PyPI (pypi-), AWS key ids (AKIA, ASIA), JWTs (eyJ).
_PREFIXED = re.compile(
    r"(?<![A-Za-z0-9_-])"
    r"(?:sk-|sk_|rk_|gh[pousr]_|github_pat_|glpat-|xox[abepros]-|xapp-|AIza|hf_|npm_|pypi-|AKIA|ASIA|eyJ)"
    r"(?P<body>[\w.+/=-]{8,})",
    re.ASCII,
)
# A long run of letters and digits mixing both: no word, name or path component looks like that.
_RUN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9]{24,}(?![A-Za-z0-9])")
_MARK = "\x00"  # stands for REDACTED until the arguments are quoted (no argument can hold a NUL)
# A JSON member with a string value ({"password": "VALUE"}, a config given as one argument, or
# echoed on stderr): the value goes when the name is secret-bearing. The name is at most 64
# characters, and a value that never ends is scanned once: linear in the text.
_JSON_MEMBER = re.compile(r'"(?P<name>[A-Za-z][\w.-]{0,63})"\s*:\s*"(?P<value>(?:[^"\\]|\\.)*)"')
# A header option (curl's and mcp-remote's -H, --header; --headers), any case, alone or with
# "=NAME" after it: it may be given the header's name and its value as two arguments.
_HEADER_OPTION = re.compile(r"(?i)(?:-h|--headers?)(?:=(?P<name>.*))?", re.DOTALL)
# A header name alone (an HTTP token, RFC 9110), as the first of those two arguments.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def secret_name(name: str) -> bool:
    """Whether an option, variable or header called ``name`` holds a secret, by its last word.

    The name is split into words at ``-``, ``_``, ``.`` and camelCase humps, leading dashes
    dropped: ``--api-key``, ``--apiKey``, ``GITHUB_TOKEN``, ``X-Auth-Token``, ``--client-secret``,
    ``--db-password``, ``Authorization`` and ``--auth`` are secret-bearing; ``--token-file``,
    ``--api-key-env`` (they say where a secret is), ``--no-auth`` (a flag), ``--max-tokens``
    and ``--author`` are not.
    """
    words = [w for w in _WORDS.split(_CAMEL.sub("-", name.lstrip("-")).lower()) if w]
    if not words or words[0] == "no":
        return False
    last = words[-1]
    return last in _SECRET_WORDS or last.endswith(_SECRET_ENDINGS)


def _hide_words(text: str, hidden: list[str]) -> str:
    """``text`` with its URLs made safe, its token-like words and secret JSON members marked.

    What was hidden goes in ``hidden``.
    """

    def token(match: re.Match[str]) -> str:
        if match.re is _PREFIXED:
            # A digit or a capital after the prefix: sk-learn-helpers is a name, sk-test-SECRET123 a key.
            secret = any(c.isdigit() or c.isupper() for c in match.group("body"))
        else:
            secret = not match.group().isalpha() and not match.group().isdigit()  # letters and digits mixed
        if not secret:
            return match.group()
        hidden.append(match.group())
        return _MARK

    def member(match: re.Match[str]) -> str:
        if not match["value"] or not secret_name(match["name"]):
            return match.group()
        hidden.append(match["value"])
        return match.group()[: match.start("value") - match.start()] + _MARK + '"'

    if '"' in text:
        text = _JSON_MEMBER.sub(member, text)
    if "://" in text:
        text = _URL.sub(lambda m: safe_url(m.group()).replace(REDACTED, _MARK), text)
    return _RUN.sub(token, _PREFIXED.sub(token, text))


def _quote(arg: str) -> str:
    """``arg`` quoted for a shell where needed, its marks shown as REDACTED (unquoted, to read well)."""
    if _MARK not in arg:
        return shlex.quote(arg)
    stand_in = "REDACTED"
    while stand_in in arg:  # a word made of characters shlex leaves unquoted, not already in arg
        stand_in += "_"
    return shlex.quote(arg.replace(_MARK, stand_in)).replace(stand_in, REDACTED)


def _redact_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` with the mark for each secret (see :func:`safe_command`), and the secrets it hid."""
    shown: list[str] = []
    hidden: list[str] = []
    hide_next = False
    header_next = False  # the argument after a bare header option: perhaps a header's name
    for arg in argv:
        if hide_next and not arg.startswith("--"):
            shown.append(_MARK)
            hidden.append(arg)
            hide_next = False
            continue
        hide_next = False
        if header_next and _HEADER_NAME.fullmatch(arg) and not arg.startswith("-"):
            # --header NAME VALUE: the value is the next argument when the name is a secret's.
            header_next = False
            hide_next = secret_name(arg)
            shown.append(arg)
            continue
        header_next = False
        header = _HEADER_OPTION.fullmatch(arg)
        if header and header["name"] is None:
            header_next = True
            shown.append(arg)
            continue
        if header and _HEADER_NAME.fullmatch(header["name"]) and secret_name(header["name"]):
            hide_next = True  # --header=NAME VALUE
            shown.append(arg)
            continue
        option = _OPTION.fullmatch(arg)
        assignment = None if option else _ASSIGNMENT.fullmatch(arg)
        if option and secret_name(option.group("name")):
            hide_next = True
            shown.append(arg)
        elif assignment and secret_name(assignment.group("name")):
            shown.append(assignment.group("name") + assignment.group("sep") + _MARK)
            hidden.append(assignment.group("value"))
        elif assignment and (inner := _ASSIGNMENT.fullmatch(assignment.group("value"))) and secret_name(inner["name"]):
            # An option given a secret's assignment in the same argument: --env=DB_PASSWORD=VALUE,
            # --header=Authorization: VALUE (as -e DB_PASSWORD=VALUE is when they are two).
            shown.append(assignment.group("name") + assignment.group("sep") + inner["name"] + inner["sep"] + _MARK)
            hidden.append(inner["value"])
        else:
            shown.append(_hide_words(arg, hidden))
    return shown, hidden


def safe_command(argv: Sequence[str]) -> str:
    """A command line fit for errors and logs: ``argv`` joined as a shell would read it, secrets hidden.

    Replaced by :data:`REDACTED` (the rules are in docs/mcp.md, "Names in errors and logs"):

    - the value of an option whose name is secret-bearing (:func:`secret_name`), in the
      forms ``--api-key VALUE``, ``--api-key=VALUE``, ``-token VALUE``, ``API_KEY=VALUE``
      (as given to ``docker run -e``) and ``Authorization: VALUE`` (a header for ``--header``),
      also given to an option in the same argument (``--env=DB_PASSWORD=VALUE``);
      in the first form the next argument is the value unless it starts with ``--``;
    - the value of a header with such a name given to a header option (``--header``,
      ``--headers``, ``-H``, any case) as two arguments: ``--header Authorization VALUE``
      and ``--header=Authorization VALUE`` show the name and hide ``VALUE``;
    - in a URL, the credentials, query and fragment, as :func:`safe_url` does;
    - a word that looks like a token: a well-known prefix (``sk-``, ``ghp_``, ``xoxb-``,
      ``AIza``...) and at least 8 more characters with a digit or a capital among them; or a
      run of 24 or more ASCII letters and digits mixing both.

    The rest is kept, to tell servers apart: ``npx -y @modelcontextprotocol/server-filesystem
    /srv/data`` is shown as it is. One-letter flags (``-k KEY``) are not recognised (``-k``,
    ``-p`` and ``-t`` mean too many other things), though the key itself may look like a token.
    """
    return " ".join(_quote(arg) for arg in _redact_argv(argv)[0])


def command_secrets(argv: Sequence[str]) -> list[str]:
    """The values :func:`safe_command` hides in ``argv`` (not a URL's parts), for :func:`scrub`."""
    return _redact_argv(argv)[1]


SCRUB_MIN = 4
"""Known secrets shorter than this are not searched for by :func:`scrub`: they would blank out ordinary words."""


def scrub(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` (a line a program wrote) with ``secrets``, URL credentials and token-like words hidden.

    For what a child process says about itself: a server that fails may echo the key it was
    given (``invalid API key: sk-...``). Each of ``secrets`` at least :data:`SCRUB_MIN`
    characters long is replaced wherever it appears, longest first; then URLs and token-like
    words are hidden as in :func:`safe_command`.
    """
    text = text.replace(_MARK, "\ufffd")  # a NUL in the text must not come out as REDACTED
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= SCRUB_MIN:
            text = text.replace(secret, _MARK)
    return _hide_words(text, []).replace(_MARK, REDACTED)
