"""The Lua scripts of the ``redis`` store: each checks ownership and writes in one atomic step.

Every key a script touches belongs to one session and shares its hash tag
(``{prefix}{<session id>}:...``), so the scripts also run on Redis Cluster. Only
commands Valkey also has are used. ``KEYS`` are, in order, the session's
ownership key, fencing counter, record and replay log (:func:`session_keys`).
"""

from __future__ import annotations

__all__ = [
    "APPEND",
    "CANCELS",
    "CLAIM",
    "CREATE",
    "DELETE",
    "RELEASE",
    "RENEW",
    "SAVE",
    "cancel_channel",
    "cancel_key",
    "session_keys",
]


def session_keys(prefix: str, session_id: str) -> list[str]:
    """The ownership key, fencing counter, record and replay log of one session."""
    tag = f"{prefix}{{{session_id}}}"
    return [f"{tag}:owner", f"{tag}:fence", f"{tag}:record", f"{tag}:log"]


def cancel_key(prefix: str, session_id: str) -> str:
    """The set of ``cancel`` ids (JSON) other processes passed to the session's owner."""
    return f"{prefix}{{{session_id}}}:cancel"


def cancel_channel(prefix: str) -> str:
    """The pub/sub channel telling every process which session has a cancel waiting (its id)."""
    return f"{prefix}cancel"


# The cancels waiting for a session, taken (the set is emptied). KEYS: the cancel set.
CANCELS = """
local ids = redis.call('SMEMBERS', KEYS[1])
if #ids > 0 then redis.call('DEL', KEYS[1]) end
return ids
"""


# A new session: ownership (a new fencing token) and its record. ARGV: lease ms, record, record ttl ms.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local fence = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], fence, 'PX', ARGV[1])
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
return fence
"""

# Take an existing session if nobody owns it. ARGV: lease ms.
# Returns {0} when another process owns it, {-1} when it is gone, else
# {fence, record, the newest logged seq}.
CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
local record = redis.call('GET', KEYS[3])
if not record then return {-1} end
local fence = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], redis.call('PTTL', KEYS[3]))
redis.call('SET', KEYS[1], fence, 'PX', ARGV[1])
local newest = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
local seq = 0
if #newest > 0 then seq = tonumber(string.match(newest[1][1], '%-(%d+)$')) end
return {fence, record, seq}
"""

# Append frames to the replay log, only while this fencing token owns the session.
# ARGV: fence, maxlen, log ttl ms, then seq, frame pairs. XADD refuses an id not above
# the newest, which is the seq check: a frame is never logged twice or out of order.
APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 4, #ARGV, 2 do
    redis.call('XADD', KEYS[4], 'MAXLEN', ARGV[2], '0-' .. ARGV[i], 'f', ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[4], ARGV[3])
return 1
"""

# Save the record (and keep the log as long), only while this fencing token owns the session.
# ARGV: fence, record, ttl ms.
SAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

# Let the session go: any process may take it. ARGV: fence.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# Keep owning the session for another lease. ARGV: fence, lease ms.
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# The session ended for good: forget all of it. ARGV: fence.
DELETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return 1
"""
