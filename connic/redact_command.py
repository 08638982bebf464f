"""URLs, command lines and a child process's output, fit for connic's errors and logs.

connic's own errors and logs name things configured with secrets in them: :func:`safe_url`
and :func:`safe_command` give a URL and a command line (an MCP server's) fit for them, and
:func:`scrub` a line a child process wrote. Keeping secrets out of aiohttp's logs and 400
bodies is :mod:`connic.redact` (which re-exports these names).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "REDACTED",
    "SCRUB_MIN",
    "command_secrets",
    "safe_command",
    "safe_url",
    "scrub",
    "secret_name",
]

REDACTED = "[redacted]"


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
