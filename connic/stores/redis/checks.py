"""What the ``redis`` store checks before it uses a server: its ``[store] url``, and its version."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["check_url", "too_old", "url_problem"]


def check_url(url: str) -> None:
    """Refuse (ValueError) a ``redis://`` or ``rediss://`` URL whose path is not a database number.

    redis-py ignores such a path (``/sessions``: database 0) or reads its digits run
    together (``/1/2``: database 12): the store would silently use another database.
    """
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss") and not re.fullmatch(r"/?[0-9]*", parts.path):
        raise ValueError(f"the path {parts.path!r} is not a database number (redis://host:port/0)")


def too_old(version: str) -> bool:
    """Whether a server reporting ``redis_version`` ``version`` lacks what the scripts use.

    Redis 6.2 brought ``XADD ... MINID`` and ``GETDEL``.

    Valkey reports the Redis version it is compatible with (7.2.4 for Valkey 7 and 8).
    An unknown or unreadable version is given the benefit of the doubt.
    """
    parts = version.split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return False
    return (int(parts[0]), int(parts[1])) < (6, 2)


def url_problem(exc: ValueError | TypeError) -> str:
    """What is wrong with the URL, for the one line that refuses it."""
    unknown = re.search(r"unexpected keyword argument '([^']*)'", str(exc))
    if isinstance(exc, TypeError) and unknown:
        return f"unknown query parameter {unknown.group(1)!r} (not a redis-py connection option)"
    return str(exc)
