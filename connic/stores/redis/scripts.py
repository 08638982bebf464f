"""The Lua scripts of the ``redis`` store's sessions: each checks ownership and writes in one atomic step.

Every key a script touches belongs to one session and shares its hash tag
(``{prefix}{<session id>}:...``), so the scripts also run on Redis Cluster. Only commands
Valkey also has are used. Unless a script says otherwise, ``KEYS`` are, in order, the
session's ownership key, fencing counter, record, replay log and history
(:func:`~connic.stores.redis.keys.session_keys`). The limits' scripts are in
:mod:`~connic.stores.redis.limit_scripts`; the names of every key and channel in
:mod:`~connic.stores.redis.keys`.
"""

from __future__ import annotations

__all__ = [
    "APPEND",
    "CANCELS",
    "CLAIM",
    "CREATE",
    "DELETE",
    "END",
    "RELEASE",
    "RENEW",
    "RESUMED",
    "SAVE",
]


# The cancels waiting for a session, in the order they were sent, taken (the list is emptied)
# by the process owning it: a list, as every cancel gets its own answer (two of one id, two).
# KEYS: the cancel list, the ownership key. ARGV: fence. Nothing is taken by a process that
# no longer owns it (it let the session go): the list waits for the next owner. A set is
# what earlier code left (a rolling upgrade from it): read all the same, in no order.
CANCELS = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {} end
local ids
if redis.call('TYPE', KEYS[1])['ok'] == 'set' then
  ids = redis.call('SMEMBERS', KEYS[1])
else
  ids = redis.call('LRANGE', KEYS[1], 0, -1)
end
if #ids > 0 then redis.call('DEL', KEYS[1]) end
return ids
"""


# Write the session's history list (KEYS[5], one JSON array per entry), in the script that
# writes its record: the list is emptied first when ``replace``, then the entries in ARGV from
# index ``first`` on are appended (1,000 per RPUSH: Lua's unpack has a stack limit of some
# 8,000), then it is trimmed to its newest ``keep`` entries (what the session holds now; none:
# the key is deleted, as ``LTRIM key -0 -1`` would keep everything) and expires with the record.
_HISTORY = """
local function history(replace, keep, first, ttl)
    if replace then redis.call('DEL', KEYS[5]) end
    for i = first, #ARGV, 1000 do
        redis.call('RPUSH', KEYS[5], unpack(ARGV, i, math.min(i + 999, #ARGV)))
    end
    if keep == 0 then
        redis.call('DEL', KEYS[5])
    else
        redis.call('LTRIM', KEYS[5], -keep, -1)
        redis.call('PEXPIRE', KEYS[5], ttl)
    end
end
"""

# Whether the fencing token ARGV[1] owns the session (KEYS[1] the ownership key, KEYS[2] the
# fencing counter, KEYS[3] the record): 1 if it does, 0 if another process does, -1 if nobody
# does and it cannot be taken back. A lease that lapsed while Redis could not be reached (or was
# paused) for longer than it, with no claim since (the counter still at this token) and the
# record still there, is taken back for ``lease`` ms (0: not taken back): its owner lost nothing,
# nobody took the session. After a claim since (the session was taken, and let go), or once
# Redis lost the session's keys, it is -1: this copy of the session is gone from the store.
_OWN = """
local function own(lease)
    local owner = redis.call('GET', KEYS[1])
    if owner == ARGV[1] then return 1 end
    if owner then return 0 end
    if lease ~= '0' and redis.call('GET', KEYS[2]) == ARGV[1] and redis.call('EXISTS', KEYS[3]) == 1 then
        redis.call('SET', KEYS[1], ARGV[1], 'PX', lease)
        return 1
    end
    return -1
end
"""

# A new session: ownership (a new fencing token), its record and its history.
# ARGV: lease ms, record, record ttl ms, then the history's entries. The fencing counter of an
# id never goes backwards: a session id the client names (AG-UI's threadId) is opened again
# after its session ended (DELETE) or expired, and a process still holding a token of the old
# session (its lease lapsed unnoticed) must not pass the new one's fence. Nothing of the old
# session is left to count on, so the new counter starts at Redis's clock in milliseconds,
# above every token the old one handed out (it moves on once per claim or release of the
# session: never a thousand times a second).
CREATE = (
    _HISTORY
    + """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local floor = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local fence = redis.call('INCR', KEYS[2])
if fence < floor then
    fence = floor
    redis.call('SET', KEYS[2], fence)
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], fence, 'PX', ARGV[1])
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
history(true, #ARGV - 3, 4, ARGV[3])
return fence
"""
)

# Take an existing session if nobody owns it. KEYS: every key of the session
# (:func:`~connic.stores.redis.keys.every_key`: KEYS[6] its takeover flag, KEYS[7] its end flag, KEYS[8] its cancel
# set, KEYS[10] its resumer). ARGV: lease ms, a seq or '' (see below), the connector label
# and SHA-1 (hex) of the resume token it must have, or '' and '' for no check, then the
# takeover channel and the session id, or '' and '', the owner last told or '' (see
# below), and the resume's nonce or '' (none) and '1' for its first claim or '' for the
# next ones (see below). Returns {-1} when it is gone or the check fails (nothing changed),
# {-2} when a client said goodbye to it while following it elsewhere (:data:`END`) and no
# process owns it: it is ended here (every key of it deleted, as its owner's DELETE would),
# {-3} when a newer resume claimed it (the session's resumer is no longer this resume's
# nonce: its connection is taken over), {0, owner} when another process owns it (with a
# seq: {0, owner, the logged entries after it}, so that a resume starts following the owner
# in the same round trip), else {fence, record, the newest logged seq, the history's
# entries, 1 if cancels wait for it else 0}. The token is compared by its digest: how long
# the comparison takes tells nothing about the token itself. A resume's first claim makes
# its nonce the session's resumer (for as long as the record lives; each next claim of it
# keeps it as long); when it replaces another resume's, the session id is published on the
# channel, so that a resume still following elsewhere learns it was taken over. When
# another process owns it, the token was checked and a channel is given, an owner not told
# yet (its fence is not the one last told) is told that its connection is taken over: the
# flag is set (for a lease: the owner also looks for it when it renews its leases) and the
# session id published on the channel (once per claim). A session whose end flag is set
# while another process owns it is {-1}: that owner is ending it. ARGV[10] is the latest time
# (Redis's clock, ms) at which the claim may still act, or '' (none): its process gives up on
# a reply that does not come within its ``timeout``, and a claim Redis runs only after that
# (sent while Redis stalled) would take a lease for a fence nobody learns, so that a live owner,
# whose lease lapsed in the stall, found another owner and stopped its reply while nobody
# produced it. Run later, it changes nothing: {0, the owner last told, the logged entries
# after the seq (none without one), Redis's clock}, as if another process owned it.
CLAIM = """
local record = redis.call('GET', KEYS[3])
if not record then return {-1} end
if ARGV[10] and ARGV[10] ~= '' then
    local time = redis.call('TIME')
    local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
    if now > tonumber(ARGV[10]) then
        local entries = {}
        if ARGV[2] ~= '' then entries = redis.call('XRANGE', KEYS[4], '0-' .. (tonumber(ARGV[2]) + 1), '+') end
        return {0, ARGV[7], entries, now}
    end
end
if ARGV[3] ~= '' then
    local ok, fields = pcall(cjson.decode, record)
    if not ok or fields['label'] ~= ARGV[3] or type(fields['token']) ~= 'string'
            or redis.sha1hex(fields['token']) ~= ARGV[4] then
        return {-1}
    end
end
local published = false
if ARGV[8] ~= '' then
    local resumer = redis.call('GET', KEYS[10])
    if ARGV[9] ~= '1' and resumer ~= ARGV[8] then return {-3} end
    local ttl = redis.call('PTTL', KEYS[3])
    if ttl > 0 then redis.call('SET', KEYS[10], ARGV[8], 'PX', ttl) else redis.call('SET', KEYS[10], ARGV[8]) end
    if resumer and resumer ~= ARGV[8] and ARGV[5] ~= '' then
        redis.call('PUBLISH', ARGV[5], ARGV[6])
        published = true
    end
end
local owner = redis.call('GET', KEYS[1])
if redis.call('EXISTS', KEYS[7]) == 1 then
    if owner then return {-1} end
    redis.call('DEL', unpack(KEYS))
    return {-2}
end
if owner then
    if ARGV[3] ~= '' and ARGV[5] ~= '' and owner ~= ARGV[7] then
        redis.call('SET', KEYS[6], owner, 'PX', ARGV[1])
        if not published then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
    end
    if ARGV[2] ~= '' then return {0, owner, redis.call('XRANGE', KEYS[4], '0-' .. (tonumber(ARGV[2]) + 1), '+')} end
    return {0, owner}
end
local fence = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], redis.call('PTTL', KEYS[3]))
redis.call('SET', KEYS[1], fence, 'PX', ARGV[1])
local newest = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
local seq = 0
if #newest > 0 then seq = tonumber(string.match(newest[1][1], '%-(%d+)$')) end
return {fence, record, seq, redis.call('LRANGE', KEYS[5], 0, -1), redis.call('EXISTS', KEYS[8])}
"""

# A client that resumed the session on one process, and followed the reply its owner
# answers, said goodbye (close 1000): the session ends for good, as on one process. KEYS:
# every key of the session (:func:`~connic.stores.redis.keys.every_key`: KEYS[7] its end flag). ARGV: the connector
# label and SHA-1 (hex) of the resume token (checked as CLAIM checks them), the end channel,
# the session id, and the nonce of the resume that follows (or '': no check). A resume whose
# nonce is no longer the session's resumer (KEYS[10]) was taken over by a newer one: its
# goodbye is ignored (0), as a connection's is on one process once taken over. The flag is
# set for as long as the record lives and the session id published on the channel: the
# owner ends the session as soon as it hears it (or finds the flag when it renews its lease;
# the flag goes with the session's DELETE); if the owner died, or let the session go, the
# next CLAIM finds it and ends it. A session no process owns is ended at once (every key of
# it deleted). Returns 0 when it is gone or the check
# fails (nothing changed), 1 when its owner was told, 2 when it was ended here.
END = """
local record = redis.call('GET', KEYS[3])
if not record then return 0 end
local ok, fields = pcall(cjson.decode, record)
if not ok or fields['label'] ~= ARGV[1] or type(fields['token']) ~= 'string'
        or redis.sha1hex(fields['token']) ~= ARGV[2] then
    return 0
end
if ARGV[5] and ARGV[5] ~= '' and redis.call('GET', KEYS[10]) ~= ARGV[5] then return 0 end
if not redis.call('GET', KEYS[1]) then
    redis.call('DEL', unpack(KEYS))
    return 2
end
local ttl = redis.call('PTTL', KEYS[3])
if ttl > 0 then redis.call('SET', KEYS[7], '1', 'PX', ttl) else redis.call('SET', KEYS[7], '1') end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# Append frames to the replay log, as one entry, only while this fencing token owns the
# session (:data:`_OWN`: its result). ARGV: fence, the seq below which entries are trimmed (an
# entry's id is its newest frame's seq), log ttl ms, the seq of the newest frame (the entry's
# id), the frames joined by newlines (the entry's one field, ``f``), then the lease ms. XADD
# refuses an id not above the newest, which is the seq check: a write is never logged twice,
# nor after a newer one. The log expires with the record (the ttl given only when there is
# none): frames logged in the batch that lets the session go come from a process that no
# longer knows the session's ttl, and a log kept past its record is never read again.
APPEND = (
    _OWN
    + """
local owned = own(ARGV[6])
if owned ~= 1 then return owned end
redis.call('XADD', KEYS[4], 'MINID', '0-' .. ARGV[2], '0-' .. ARGV[4], 'f', ARGV[5])
local ttl = redis.call('PTTL', KEYS[3])
if ttl > 0 then redis.call('PEXPIRE', KEYS[4], ttl) else redis.call('PEXPIRE', KEYS[4], ARGV[3]) end
return 1
"""
)

# Whether the history list (KEYS[5]) is what its owner last wrote: ``count`` items, the last
# of SHA-1 ``digest`` (:class:`~connic.stores.redis.record.Listed`). Redis restarted from an
# older snapshot (or a replica promoted behind its primary) holds an older list.
_INTACT = """
local function intact(count, digest)
    if redis.call('LLEN', KEYS[5]) ~= tonumber(count) then return false end
    return count == '0' or redis.sha1hex(redis.call('LINDEX', KEYS[5], -1)) == digest
end
"""

# Save the record and the history (and keep the log as long), only while this fencing token
# owns the session (:data:`_OWN`: its result). ARGV: fence, record, ttl ms, replace (1: the
# list is rewritten, 0: the entries are appended), the number of entries the session holds,
# the lease ms, the list's count and digest before (:data:`_INTACT`; for replace 0), then the
# entries to write. A list that is not what they say is left as it is, the record written:
# 2, and the next save writes the list whole (appended to, it had a hole).
SAVE = (
    _HISTORY
    + _OWN
    + _INTACT
    + """
local owned = own(ARGV[6])
if owned ~= 1 then return owned end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
local result = 1
if ARGV[4] == '1' or intact(ARGV[7], ARGV[8]) then
    history(ARGV[4] == '1', tonumber(ARGV[5]), 9, ARGV[3])
else
    result = 2
    redis.call('PEXPIRE', KEYS[5], ARGV[3])
end
redis.call('PEXPIRE', KEYS[4], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return result
"""
)

# Let the session go: any process may take it. ARGV: fence, then, after a SAVE that appended,
# the list's count and digest before that SAVE and after it (:data:`_INTACT`). A list that is
# neither (that SAVE found it older and wrote none of it) is not let go (2): its owner writes
# it whole first. The fencing counter moves on, so that this token can never take the session
# back (:data:`_OWN`) by a write of its own after it. Given every key of the session
# (:func:`~connic.stores.redis.keys.every_key`), its end flag (KEYS[7]) and resumer (KEYS[10])
# are kept no longer than the record: set for the record's ttl while it was live, they outlived
# by up to ``session_timeout`` a session that then expired ``resume_window`` after this.
RELEASE = (
    _INTACT
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] and not intact(ARGV[2], ARGV[3]) and not intact(ARGV[4], ARGV[5]) then return 2 end
redis.call('DEL', KEYS[1])
redis.call('INCR', KEYS[2])
local ttl = redis.call('PTTL', KEYS[3])
if #KEYS >= 10 and ttl > 0 then
    for _, i in ipairs({7, 10}) do
        local left = redis.call('PTTL', KEYS[i])
        if left == -1 or left > ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
    end
end
return 1
"""
)

# Keep owning the session for another lease. KEYS: every key of the session
# (:func:`~connic.stores.redis.keys.every_key`: KEYS[6] its takeover flag, KEYS[7] its end flag, KEYS[8] its cancel
# set). ARGV: fence, lease ms, the ttl ms its record, history, log and fence are kept
# for while it is live here (0: left as they are: a session still being taken over, whose
# record says nothing yet), then how many entries its history list holds as its owner last
# wrote it ('': unknown). Without the ttl a reply longer than it, or a session taken over
# (its keys expiring a let-go's resume_window later) and kept quiet, saw its keys expire
# under it, as no save comes meanwhile. Returns 0 when another process owns it, -1 when
# nobody does and it cannot be taken back (:data:`_OWN`), else 1, plus 2 when a resume
# elsewhere took its connection over (the
# flag, taken: a pub/sub message may have been lost; a flag naming an earlier owner's fence,
# set for a process that died before taking it, is taken and ignored), plus 4 when a client following it
# elsewhere said goodbye (the end flag: left for DELETE, which the session's end runs, so
# that a session this process lets go instead, a rebuild that failed, still ends at the
# next claim), plus 8 when cancels wait for it, plus 16 when its history list holds another
# number of entries (Redis came back older, and an idle session has no save coming to find
# it; only the length: hashing the last entry of every session at every renewal cost more
# than a renewal, and a save compares that too, :data:`_INTACT`).
RENEW = (
    _OWN
    + """
local owned = own(ARGV[2])
if owned ~= 1 then return owned end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[3] ~= '0' then
    for i = 2, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
local result = 1
if redis.call('GETDEL', KEYS[6]) == ARGV[1] then result = result + 2 end
if redis.call('EXISTS', KEYS[7]) == 1 then result = result + 4 end
if redis.call('EXISTS', KEYS[8]) == 1 then result = result + 8 end
if ARGV[4] and ARGV[4] ~= '' and redis.call('LLEN', KEYS[5]) ~= tonumber(ARGV[4]) then result = result + 16 end
return result
"""
)

# A resume on the process that owns the session attached a connection to it: a resume still
# following it elsewhere was taken over (its resumer is none now). KEYS: its resumer.
# ARGV: the takeover channel, the session id (published when there was a resumer).
RESUMED = """
if redis.call('DEL', KEYS[1]) == 1 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return 1
"""

# The session ended for good: forget all of it, only while this fencing token owns it
# (:data:`_OWN`: its result). KEYS: every key of the session (:func:`~connic.stores.redis.keys.every_key`). ARGV: fence.
# A lease that lapsed unnoticed (Redis paused longer than it, before the next renewal took it
# back) is taken back to be deleted, as a write takes it back: the ended session was otherwise
# left in Redis until its keys expired, and a resume with its token brought it back. A session
# another process owns, or claimed since (the counter moved on), is left as it is.
DELETE = (
    _OWN
    + """
local owned = own('1')
if owned ~= 1 then return owned end
redis.call('DEL', unpack(KEYS))
return 1
"""
)
