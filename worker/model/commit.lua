-- A model's commit of one batch (see store.py), in one round trip: the lease and version fences
-- are checked inside Redis instead of WATCH, GET and EXEC.
-- Redis does not roll a script back when a command in it fails, so the script first checks all that
-- could fail (the fences, the types of the keys, the consumer groups, the ACL) and only then
-- writes, its first write one that Redis refuses when out of memory (see below); no unpack() passes
-- more than 2000 values (Lua's stack holds about 8000).
-- KEYS: lease, checkpoint, memory, policy, then every stream written or acknowledged.
-- ARGV: token, lease ttl (ms), version the stored checkpoint must have (0: none), trim (MAXLEN|MINID),
--   trim threshold, group, reply ttl (ms), then sections: the KEYS indices of clients' reply
--   streams; checkpoint field/value pairs; memory field/value pairs; memory fields to delete
--   (environments forgotten); policy field/value pairs; acks: per stream its KEYS index and a
--   section of entry IDs; messages: per message its stream's KEYS index and a section of
--   field/value pairs.
-- A client's reply stream expires reply ttl after each write, so those of clients gone away vanish.
-- One that is not a stream (a REPLY_TO naming some other key) gets nothing, and does not hold up
-- the commit: any client can name any key. Returns the names of such keys.
local CHUNK = 1000  -- values per unpack(); even, so field/value pairs are never split
local token, ttl, version, trim, threshold, group, reply_ttl = unpack(ARGV, 1, 7)
-- The lease must be ours, or free: one that expired while a long batch was handled (no successor
-- took it) is taken again here, as the version fence below shows that nobody committed meanwhile.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= token then
  return redis.error_reply('LOSTLEASE the lease is held by another consumer')
end
local expected = redis.call('HMGET', KEYS[2], 'version')[1] or '0'  -- no checkpoint: version 0
if expected ~= version then
  return redis.error_reply('STALE the checkpoint is at version ' .. expected .. ', not ' .. version)
end
i = 8
local replies, unusable, dropped = {}, {}, {}
local replies_first, replies_last = section()
for r = replies_first, replies_last do replies[tonumber(ARGV[r])] = true end
for k = 2, #KEYS do
  local kind, want = redis.call('TYPE', KEYS[k]).ok, k <= 4 and 'hash' or 'stream'
  if kind ~= want and kind ~= 'none' then
    if not replies[k] then
      return redis.error_reply('WRONGTYPE ' .. KEYS[k] .. ' is a ' .. kind .. ', not a ' .. want)
    end
    replies[k], unusable[KEYS[k]] = nil, true
    dropped[#dropped + 1] = KEYS[k]
  end
end
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
local policy_first, policy_last = section()
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
for m = 1, n_messages do
  local message = {keyed()}
  if not unusable[message[1]] then messages[#messages + 1] = message end
end
local denied = deny('HSET', KEYS[2], 'f', 'v') or deny('HSET', KEYS[3], 'f', 'v')
  or deny('SET', KEYS[1], token) or (forget_last >= forget_first and deny('HDEL', KEYS[3], 'f'))
  or (policy_last >= policy_first and deny('HSET', KEYS[4], 'f', 'v'))
for _, ack in ipairs(acks) do denied = denied or deny('XACK', ack[1], group, '0-1') end
for _, message in ipairs(messages) do denied = denied or deny('XADD', message[1], '*', 'f', 'v') end
local function each_reply(f)  -- in ARGV's order, not a Lua table's (which is arbitrary)
  for r = replies_first, replies_last do
    local k = tonumber(ARGV[r])
    if replies[k] then f(k) end
  end
end
each_reply(function(k) denied = denied or deny('PEXPIRE', KEYS[k], '1') end)
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
chunked(policy_first, policy_last, 'HSET', KEYS[4])
for _, ack in ipairs(acks) do chunked(ack[2], ack[3], 'XACK', ack[1], group) end
redis.call('SET', KEYS[1], token, 'PX', ttl)
for _, message in ipairs(messages) do
  local stream, first, last = unpack(message)
  redis.call('XADD', stream, trim, '~', threshold, '*', unpack(ARGV, first, last))
end
each_reply(function(k) redis.call('PEXPIRE', KEYS[k], reply_ttl) end)
return dropped
