"""The Lua scripts of the ``redis`` store's limits (:mod:`~connic.stores.redis.limits`).

``TAKE`` takes a token from a session's ``rate_limit`` bucket (its keys share the
session's hash tag, :func:`~connic.stores.redis.keys.rate_key`); ``IP_ENTER``,
``IP_RENEW`` and ``IP_LEAVE`` count the connections from one client address (its key,
:func:`~connic.stores.redis.keys.address_key`, and the connections counted out while
they were being added again, :func:`closed_key`, in the same slot), so they also run on
Redis Cluster.
Registered with the session scripts (:mod:`~connic.stores.redis.scripts`) when the store starts.
"""

from __future__ import annotations

from connic.stores.redis.scripts import _OWN

__all__ = ["IP_ENTER", "IP_LEAVE", "IP_RENEW", "TAKE", "closed_key"]


def closed_key(address_key: str) -> str:
    """The connections from one address counted out while they may be being added again (IP_LEAVE), by expiry."""
    return f"{address_key}:closed"


# Take a token from the session's rate limit bucket, only while this fencing token owns the session
# (:data:`_OWN`). KEYS: the ownership key, the fencing counter, the record, the bucket. ARGV: fence,
# capacity (messages), refill period ms, lease ms, the latest time (Redis's clock, ms) it may act
# or '' (:mod:`~connic.stores.redis.clock`). Returns 0 when a token was taken, the ms until
# one is available, -1 when another process owns the session, -2 when nobody does and it
# cannot be taken back, or -3 when it ran after its deadline (nothing changed: its process gave
# up on it, and the message it was for was not acked, so its client sends it again). The bucket
# is counted on Redis's clock (TIME), the same for every process; a full bucket is no key at
# all (it expires once it would have refilled).
TAKE = (
    _OWN
    + """
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
if ARGV[5] and ARGV[5] ~= '' and now > tonumber(ARGV[5]) then return -3 end
local owned = own(ARGV[4])
if owned == 0 then return -1 end
if owned == -1 then return -2 end
local capacity = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local tokens = capacity
local state = redis.call('HMGET', KEYS[4], 'tokens', 'at')
if state[1] and state[2] then
    tokens = math.min(capacity, tonumber(state[1]) + (now - tonumber(state[2])) * capacity / period)
end
if tokens < 1 then return math.max(1, math.ceil((1 - tokens) * period / capacity)) end
redis.call('HSET', KEYS[4], 'tokens', string.format('%.17g', tokens - 1), 'at', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[4], math.ceil(period))
return 0
"""
)

# Count a connection from one address in, unless the address has ``limit`` open already.
# KEYS: the address's set, its closed set (closed_key). ARGV: limit, lease ms, the connection's
# id. Entries whose lease ran out (their process died) are dropped first. Returns 1 if counted
# in, else 0. A call that timed out (its handshake refused) may still run later: its connection,
# counted out by IP_LEAVE meanwhile (in the closed set), is not counted in.
IP_ENTER = """
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if redis.call('ZSCORE', KEYS[2], ARGV[3]) then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Renew the leases of this process's connections from one address. KEYS: the address's set, its
# closed set (closed_key). ARGV: lease ms, '1' to add the entries missing or '0' not to, then the
# connections' ids. An entry dropped because its lease ran out (Redis unreachable or paused) is
# not added again: a count may fall short, never stay high. Once Redis lost its data, every entry
# is missing, and the connections still open are added again ('1'): they stopped counting, for as
# long as they stayed open. A call that timed out may still run later, after a connection it names
# was counted out: one counted out by IP_LEAVE (in the closed set) is never added again.
IP_RENEW = """
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local deadline = now + tonumber(ARGV[1])
if ARGV[2] == '1' then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
for i = 3, #ARGV do
    if ARGV[2] ~= '1' then
        redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
    elseif not redis.call('ZSCORE', KEYS[2], ARGV[i]) then
        redis.call('ZADD', KEYS[1], deadline, ARGV[i])
    end
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""

# Count a connection out while an IP_RENEW adding it again, or the IP_ENTER counting it in, may still
# run (it timed out, or has not answered yet): removed, and kept in the closed set for a lease, so that it is not added
# again. KEYS: the address's set, its closed set. ARGV: the connection's id, lease ms.
IP_LEAVE = """
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""
