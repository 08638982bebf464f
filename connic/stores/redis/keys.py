"""The names of the ``redis`` store's keys and channels, and how a resume token is compared.

Every key of one session shares its hash tag (``{prefix}{<session id>}:...``), so that the
scripts touching them (:mod:`~connic.stores.redis.scripts`) also run on Redis Cluster.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "address_key",
    "cancel_channel",
    "cancel_key",
    "end_channel",
    "end_key",
    "every_key",
    "rate_key",
    "resumer_key",
    "session_keys",
    "sha1hex",
    "takeover_channel",
    "takeover_key",
    "token_digest",
]


def sha1hex(text: str) -> str:
    """The SHA-1 (hex) of ``text`` as UTF-8, as the scripts compute it (``redis.sha1hex``).

    Any string, even one that is not valid Unicode (a lone surrogate), which Redis holds as it was sent.
    """
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def token_digest(token: str) -> str:
    """The SHA-1 of a resume token, as the scripts compare it with the record's: a wrong one simply does not match."""
    return sha1hex(token)


def session_keys(prefix: str, session_id: str) -> list[str]:
    """The ownership key, fencing counter, record, replay log and history of one session."""
    tag = f"{prefix}{{{session_id}}}"
    return [f"{tag}:owner", f"{tag}:fence", f"{tag}:record", f"{tag}:log", f"{tag}:history"]


def every_key(prefix: str, session_id: str) -> list[str]:
    """Every key of one session: :func:`session_keys`, its takeover and end flags, cancel list, rate bucket, resumer.

    What a script that may end the session for good is given (``KEYS[6]`` to ``KEYS[10]``
    are those five): it deletes them all, as nothing of an ended session may outlive it
    (a session id the client names, AG-UI's threadId, may be opened again).
    """
    return [
        *session_keys(prefix, session_id),
        takeover_key(prefix, session_id),
        end_key(prefix, session_id),
        cancel_key(prefix, session_id),
        rate_key(prefix, session_id),
        resumer_key(prefix, session_id),
    ]


def cancel_key(prefix: str, session_id: str) -> str:
    """The list of ``cancel`` ids (JSON) passed to the session's owner (a set, from earlier versions)."""
    return f"{prefix}{{{session_id}}}:cancel"


def takeover_key(prefix: str, session_id: str) -> str:
    """The flag a resume on another process sets for the session's owner: its connection is taken over."""
    return f"{prefix}{{{session_id}}}:takeover"


def end_key(prefix: str, session_id: str) -> str:
    """The flag a resume on another process sets for the session's owner: its client said goodbye (close 1000)."""
    return f"{prefix}{{{session_id}}}:end"


def rate_key(prefix: str, session_id: str) -> str:
    """The session's token bucket (``rate_limit``): a hash of its tokens and when they were counted."""
    return f"{prefix}{{{session_id}}}:rate"


def resumer_key(prefix: str, session_id: str) -> str:
    """The nonce of the session's newest resume that claimed it: a follower whose nonce it is not was taken over."""
    return f"{prefix}{{{session_id}}}:resumer"


def address_key(prefix: str, address: str) -> str:
    """The sorted set of the connections open from one client address, on every process, by lease deadline."""
    return f"{prefix}ip:{{{address}}}"


def cancel_channel(prefix: str) -> str:
    """The pub/sub channel telling every process which session has a cancel waiting (its id)."""
    return f"{prefix}cancel"


def takeover_channel(prefix: str) -> str:
    """The pub/sub channel telling every process which session a resume elsewhere took over (its id).

    Its owner's connection is taken over, and so is a resume following it whose nonce is no
    longer the session's resumer (:func:`resumer_key`).
    """
    return f"{prefix}takeover"


def end_channel(prefix: str) -> str:
    """The pub/sub channel telling every process which session a client following it elsewhere ended (its id)."""
    return f"{prefix}end"
