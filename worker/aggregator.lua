-- A decision's writes (see aggregator.py), atomic, in one round trip; and idempotent: redis-py
-- resends a command whose reply was lost, and the aggregator flushes again what it does not know
-- to be written. The first acknowledged entry tells: if it is no longer pending, this flush was
-- applied already.
-- KEYS: logits, action, contribution, dead, decided. ARGV: group, maxlen, now (ms), how many decided
-- OBS_IDs to keep, then sections: actions (count, then one section of fields each), their OBS_IDs,
-- shares (model/share pairs), dead letters (count, then one section of fields each), acknowledged
-- entry IDs.
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
