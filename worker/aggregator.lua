-- A decision's writes (see aggregator.py), atomic, in one round trip; and idempotent: redis-py
-- resends a command whose reply was lost, and the aggregator flushes again what it does not know
-- to be written. The first acknowledged entry tells: if it is no longer pending, this flush was
-- applied already.
-- KEYS: logits, contribution, dead, decided, then every action stream this flush writes (each a KEY,
-- so that Redis Cluster routes the script to, and checks, every key it touches). ARGV: group,
-- maxlen, now (ms), how many decided OBS_IDs to keep, the reply streams' TTL (ms), then sections:
-- actions (count, then for each the KEYS index of its stream and one section of fields), their
-- OBS_IDs, shares (model/share pairs), dead letters (count, then one section of fields each),
-- acknowledged entry IDs, the KEYS indices of the streams to expire (the private reply streams).
-- Returns 0 if applied already, else the KEYS indices of action streams left unwritten because the
-- key holds another type (their actions are dropped: a client cannot make the others wait).
local group, maxlen, now, remembered = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local ttl = ARGV[5]
i = 6
local function sections(keyed)
  local n, list = tonumber(ARGV[i]), {}
  i = i + 1
  for k = 1, n do
    local key
    if keyed then
      key = tonumber(ARGV[i])
      i = i + 1
    end
    local first, last = section()
    list[k] = {first, last, key}
  end
  return list
end
local actions = sections(true)
local decided = {}
local first_obs, last_obs = section()
for k = first_obs, last_obs do decided[#decided + 1] = ARGV[k] end
local shares = {section()}
local dead = sections(false)
local acks = {section()}
local expiring = {section()}
local first = ARGV[acks[1]]
if #redis.call('XPENDING', KEYS[1], group, first, first, 1) == 0 then
  return 0
end
-- Checked before the first write: Redis does not roll back the writes before a failing command.
local unusable, skipped = {}, {}
for k = 5, #KEYS do
  local kind = redis.call('TYPE', KEYS[k])['ok']
  if kind ~= 'stream' and kind ~= 'none' then
    unusable[k] = true
    skipped[#skipped + 1] = k
  end
end
for _, a in ipairs(actions) do
  if not unusable[a[3]] then
    redis.call('XADD', KEYS[a[3]], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, a[1], a[2]))
  end
end
for k = expiring[1], expiring[2] do
  local key = tonumber(ARGV[k])
  if not unusable[key] then redis.call('PEXPIRE', KEYS[key], ttl) end
end
for _, obs_id in ipairs(decided) do redis.call('ZADD', KEYS[4], now, obs_id) end
if #decided > 0 then redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -remembered - 1) end
for k = shares[1], shares[2], 2 do
  redis.call('HINCRBYFLOAT', KEYS[2], ARGV[k], ARGV[k + 1])
end
for _, d in ipairs(dead) do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, d[1], d[2]))
end
for from = acks[1], acks[2], 1000 do
  redis.call('XACK', KEYS[1], group, unpack(ARGV, from, math.min(from + 999, acks[2])))
end
return skipped
