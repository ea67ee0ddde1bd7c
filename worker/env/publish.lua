-- One round's entries (see runner.py), atomic (a blocked model wakes once, after the whole round,
-- so one round is one batch and its segments complete together: one A2C update over all
-- environments, as in SB3) and idempotent: redis-py resends a command whose reply was lost, and a
-- second copy of a round would give every environment a step twice. Each publish has a name; the
-- runner's key remembers the last one and its entry IDs, and a resent copy gets those back
-- instead of publishing again. The key also remembers the last control entry the runner finished
-- (a run's report finishes its RUN in the same script), where a restarted runner reads on: so the
-- key has no lifetime, or a runner down for longer would start afresh and miss what was sent.
-- KEYS: status, observation, the runner's key. ARGV: the publish's name, maxlen, the control entry
-- finished ('' for none), then statuses (count, then one section of fields each) and observations
-- (the same).
if redis.call('HGET', KEYS[3], 'name') == ARGV[1] then
  return cjson.decode(redis.call('HGET', KEYS[3], 'ids'))
end
local i, ids = 4, {}
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
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], 'finished', ARGV[3]) end
return ids
