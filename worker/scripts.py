"""The Lua scripts the components write with: one round trip, atomic, and idempotent.

Each replaces a ``MULTI``/``EXEC``, for two reasons. It is one round trip (a fenced transaction is
three: ``WATCH``, a read, ``EXEC``). And it can be made idempotent: redis-py resends a command whose
reply was lost (the connection dropped after Redis executed it), which for a transaction means
applying it twice; each script first checks whether it was applied already, and then answers as
the first copy did, or refuses. Redis does not roll a script back when a command in it fails, so
each script checks what could fail before its first write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def section(items: list[Any]) -> list[Any]:
    """A section of a script's arguments: its length, then its items."""
    return [len(items), *items]


def fields(mapping: Mapping[Any, Any]) -> list[Any]:
    """A section of a mapping's field/value pairs, flattened (what ``HSET`` and ``XADD`` take)."""
    return section([x for pair in mapping.items() for x in pair])


# A model's commit of one batch (see worker/state.py). The lease and version checks happen inside
# Redis, so a commit is one round trip instead of three (WATCH, GET, EXEC).
# Redis does not roll a script back when a command in it fails, so the script first checks all that
# could fail (the fences, the types of the keys, the consumer groups) and only then writes, its
# first write one that Redis refuses when out of memory (see below); no unpack() passes more than
# 2000 values (Lua's stack holds about 8000).
# KEYS: lease, checkpoint, memory, then every stream written or acknowledged.
# ARGV: token, lease ttl (ms), version the state grew from, trim (MAXLEN|MINID), trim threshold,
#   group, then sections, each a count and its items: checkpoint field/value pairs; memory
#   field/value pairs; memory fields to delete (environments forgotten); acks: per stream its KEYS
#   index and a section of entry IDs; messages: per message its stream's KEYS index and a section
#   of field/value pairs.
MAX_MESSAGE_FIELDS = 1000  # field/value pairs per XADD (one unpack of twice as many values)

# How the scripts read their sections of ARGV: ``i`` is where the next one starts (each script sets
# it past its fixed arguments); section() returns the first and last index of its items.
_SECTIONS = """
local i
local function section()
  local n = tonumber(ARGV[i])
  i = i + 1 + n
  return i - n, i - 1
end
"""

COMMIT = (
    _SECTIONS
    + """
local CHUNK = 1000  -- values per unpack(); even, so field/value pairs are never split
local token, ttl, version, trim, threshold, group = unpack(ARGV, 1, 6)
if redis.call('GET', KEYS[1]) ~= token then
  return redis.error_reply('LOSTLEASE the lease is held by another consumer')
end
local stored = redis.call('HMGET', KEYS[2], 'version', 'meta')
-- No version field: a new model (version 0), or a checkpoint written before there was one.
local expected = stored[1] or (stored[2] and version) or '0'
if expected ~= version then
  return redis.error_reply('STALE the checkpoint is at version ' .. expected .. ', not ' .. version)
end
for k = 2, #KEYS do
  local kind, want = redis.call('TYPE', KEYS[k]).ok, k <= 3 and 'hash' or 'stream'
  if kind ~= want and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[k] .. ' is a ' .. kind .. ', not a ' .. want)
  end
end
i = 7
local function keyed()  -- a stream's KEYS index, then a section
  local stream = KEYS[tonumber(ARGV[i])]
  i = i + 1
  return stream, section()
end
-- Inside a script the user's ACL is checked command by command: a user denied one (an ACL older
-- than this script) would stop it halfway, after its first writes. Ask before writing (Redis 7
-- can tell; older servers and fakeredis cannot). DENIED, not NOPERM: nothing was written.
local function deny(command, ...)
  if redis.acl_check_cmd and not redis.acl_check_cmd(command, ...) then
    return redis.error_reply('DENIED this user may not run ' .. command .. ' on ' .. ...)
  end
end
local checkpoint_first, checkpoint_last = section()
local memory_first, memory_last = section()
local forget_first, forget_last = section()
local acks = {}
local n_acks = tonumber(ARGV[i])
i = i + 1
for a = 1, n_acks do
  local stream, first, last = keyed()
  local denied = deny('XPENDING', stream, group)
  if denied then return denied end
  local ok = redis.pcall('XPENDING', stream, group)
  if type(ok) == 'table' and ok.err then
    return redis.error_reply('NOGROUP ' .. stream .. ' has no consumer group ' .. group)
  end
  acks[a] = {stream, first, last}
end
local messages = {}
local n_messages = tonumber(ARGV[i])
i = i + 1
for m = 1, n_messages do messages[m] = {keyed()} end
local denied = deny('HSET', KEYS[2], 'f', 'v') or deny('HSET', KEYS[3], 'f', 'v')
  or deny('PEXPIRE', KEYS[1], '1') or (forget_last >= forget_first and deny('HDEL', KEYS[3], 'f'))
for _, ack in ipairs(acks) do denied = denied or deny('XACK', ack[1], group, '0-1') end
for _, message in ipairs(messages) do denied = denied or deny('XADD', message[1], '*', 'f', 'v') end
if denied then return denied end
-- Every check passed: write. XACK and HSET go in chunks, which changes nothing: they add up.
local function chunked(first, last, command, ...)
  for from = first, last, CHUNK do
    local args = {...}
    for _, value in ipairs({unpack(ARGV, from, math.min(from + CHUNK - 1, last))}) do
      args[#args + 1] = value
    end
    redis.call(command, unpack(args))
  end
end
-- HSET first: out of memory, Redis refuses a script's first write if it may grow memory (HSET
-- may, PEXPIRE and XACK may not), and then nothing is written; after that first write it refuses
-- nothing more.
chunked(checkpoint_first, checkpoint_last, 'HSET', KEYS[2])
chunked(memory_first, memory_last, 'HSET', KEYS[3])
chunked(forget_first, forget_last, 'HDEL', KEYS[3])
for _, ack in ipairs(acks) do chunked(ack[2], ack[3], 'XACK', ack[1], group) end
redis.call('PEXPIRE', KEYS[1], ttl)
for _, message in ipairs(messages) do
  local stream, first, last = unpack(message)
  redis.call('XADD', stream, trim, '~', threshold, '*', unpack(ARGV, first, last))
end
return 'OK'
"""
)


# A decision's writes, atomic, in one round trip; and idempotent: redis-py resends a command whose
# reply was lost, and the aggregator flushes again what it does not know to be written. The first
# acknowledged entry tells: if it is no longer pending, this flush was applied already.
# KEYS: logits, action, contribution, dead, decided. ARGV: group, maxlen, now (ms), how many decided
# OBS_IDs to keep, then sections (a count, then the items): actions (count, then one section of
# fields each), their OBS_IDs, shares (model/share pairs), dead letters (count, then one
# section of fields each), acknowledged entry IDs.
FLUSH = (
    _SECTIONS
    + """
local group, maxlen, now, remembered = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
i = 5
local function sections()
  local n, list = tonumber(ARGV[i]), {}
  i = i + 1
  for k = 1, n do list[k] = {section()} end
  return list
end
local actions = sections()
local decided = {}
local first_obs, last_obs = section()
for k = first_obs, last_obs do decided[#decided + 1] = ARGV[k] end
local shares = {section()}
local dead = sections()
local acks = {section()}
local first = ARGV[acks[1]]
if #redis.call('XPENDING', KEYS[1], group, first, first, 1) == 0 then
  return 0
end
for _, a in ipairs(actions) do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, a[1], a[2]))
end
for _, obs_id in ipairs(decided) do redis.call('ZADD', KEYS[5], now, obs_id) end
if #decided > 0 then redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -remembered - 1) end
for k = shares[1], shares[2], 2 do
  redis.call('HINCRBYFLOAT', KEYS[3], ARGV[k], ARGV[k + 1])
end
for _, d in ipairs(dead) do
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, d[1], d[2]))
end
for from = acks[1], acks[2], 1000 do
  redis.call('XACK', KEYS[1], group, unpack(ARGV, from, math.min(from + 999, acks[2])))
end
return 1
"""
)


# One round's entries, atomic (a blocked model wakes once, after the whole round, so one round is
# one batch and its segments complete together: one A2C update over all environments, as in SB3)
# and idempotent: redis-py resends a command whose reply was lost, and a second copy of a round
# would give every environment a step twice. Each publish has a name; the runner's key remembers
# the last one and its entry IDs, and a resent copy gets those back instead of publishing again.
# KEYS: status, observation, the runner's key. ARGV: the publish's name, maxlen, then statuses
# (count, then one section of fields each) and observations (the same).
PUBLISH = """
if redis.call('HGET', KEYS[3], 'name') == ARGV[1] then
  return cjson.decode(redis.call('HGET', KEYS[3], 'ids'))
end
local i, ids = 3, {}
for _, stream in ipairs({KEYS[1], KEYS[2]}) do
  local n = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, n do
    local count = tonumber(ARGV[i])
    ids[#ids + 1] = redis.call('XADD', stream, 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, i + 1, i + count))
    i = i + 1 + count
  end
end
redis.call('HSET', KEYS[3], 'name', ARGV[1], 'ids', cjson.encode(ids))
redis.call('EXPIRE', KEYS[3], 86400)
return ids
"""


# The GET and the taking of the shares, atomic and idempotent: redis-py resends a command whose
# reply was lost, and a second GET, or a second take that finds the hash already gone, would be
# wrong. The shares move to a key of this request, which also keeps the GET's ID: a resent script
# finds it and answers the same. KEYS: evolution stream, contribution hash, this request's key.
# ARGV: maxlen, the GET entry's data, '1' to take the shares.
REQUEST = """
local get_id = redis.call('HGET', KEYS[3], '.get_id')
if not get_id then
  get_id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'data', ARGV[2])
  if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then redis.call('RENAME', KEYS[2], KEYS[3]) end
  redis.call('HSET', KEYS[3], '.get_id', get_id)
  redis.call('EXPIRE', KEYS[3], 3600)
end
return redis.call('HGETALL', KEYS[3])
"""
