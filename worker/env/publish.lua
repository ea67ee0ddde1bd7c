-- A run's status reports (see runner.py), atomic and idempotent: redis-py resends a command whose
-- reply was lost, and a report published twice would count an episode twice. Each publish has a
-- name; the runner's key remembers the last one, and a resent copy is not published again. The key
-- also remembers the last control entry the runner finished (a run's report finishes its RUN in the
-- same script), where a restarted runner reads on: so the key has no lifetime, or a runner down for
-- longer would start afresh and miss what was sent.
-- KEYS: status, the runner's key. ARGV: the publish's name, maxlen, the control entry finished
-- ('' for none), then the reports, one section of fields each.
if redis.call('HGET', KEYS[2], 'name') == ARGV[1] then
  return 0
end
local i = 4
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, i + 1, i + count))
  i = i + 1 + count
end
redis.call('HSET', KEYS[2], 'name', ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'finished', ARGV[3]) end
return 1
