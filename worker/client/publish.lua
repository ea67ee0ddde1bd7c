-- One client's observations, at once (see core.py): one round trip, and idempotent per environment
-- step, so a step sent again (redis-py resending a command whose reply was lost, or the client
-- sending a step that went unanswered once more) is published once. The client's key remembers,
-- per ENV_ID, the session, STEP and entry ID last published; a message whose session and STEP
-- match gets that entry's ID back instead of a second entry.
-- KEYS: the stream observations go to, the client's key, its reply stream, and in local mode the
-- model's policy hash. ARGV: session, maxlen, key ttl (ms), trim reply stream below
-- this ID ('' for no), then per message: ENV_ID, STEP, and a section of field/value pairs.
-- Returns the entry IDs, then (local mode) the policy hash's updates and seen.
local session, maxlen, ttl, trim_below = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local i, ids = 5, {}
while i <= #ARGV do
  local env, step, count = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local name = session .. ':' .. step .. ':'
  local last = redis.call('HGET', KEYS[2], env)
  if last and string.sub(last, 1, #name) == name then
    ids[#ids + 1] = string.sub(last, #name + 1)
  else
    local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, i + 3, i + 2 + count))
    redis.call('HSET', KEYS[2], env, name .. id)
    ids[#ids + 1] = id
  end
  i = i + 3 + count
end
redis.call('PEXPIRE', KEYS[2], ttl)
if trim_below ~= '' then redis.call('XTRIM', KEYS[3], 'MINID', trim_below) end
if KEYS[4] then
  local policy = redis.call('HMGET', KEYS[4], 'updates', 'seen')
  ids[#ids + 1] = policy[1] or ''
  ids[#ids + 1] = policy[2] or ''
end
return ids
