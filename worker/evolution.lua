-- The GET and the taking of the shares (see evolution.py), atomic and idempotent: redis-py
-- resends a command whose reply was lost, and a second GET, or a second take that finds the hash
-- already gone, would be wrong. The shares move to a key of this request, which also keeps the
-- GET's ID: a resent script finds it and answers the same.
-- KEYS: evolution stream, contribution hash, this request's key.
-- ARGV: maxlen, the GET entry's data, '1' to take the shares.
local get_id = redis.call('HGET', KEYS[3], '.get_id')
if not get_id then
  get_id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'data', ARGV[2])
  if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then redis.call('RENAME', KEYS[2], KEYS[3]) end
  redis.call('HSET', KEYS[3], '.get_id', get_id)
  redis.call('EXPIRE', KEYS[3], 3600)
end
return redis.call('HGETALL', KEYS[3])
