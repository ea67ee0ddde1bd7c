-- A generation's beginning (see generation.py), atomic and idempotent: its number, its GET and, for
-- fitness=contribution, the taking of the shares, at once. Its key remembers all of it until the
-- generation is over, so an evolution killed mid-generation is finished by the next one (which
-- finds the key and gets it back instead of beginning another), and redis-py resending this script
-- after a lost reply gets the same answer: a second GET, a second number, or a second take that
-- finds the hash already gone, would be wrong. The shares move to that key (their fields are
-- model IDs; the generation's own fields begin with a dot).
-- KEYS: evolution stream, contribution hash, generation counter, the generation's key.
-- ARGV: maxlen, the GET entry's data, '1' to take the shares, the live models (JSON), the seed of
-- the generation's randomness, the weights stream's last ID, the key's lifetime (ms).
if not redis.call('HGET', KEYS[4], '.get_id') then
  local generation = redis.call('INCR', KEYS[3])
  local get_id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'data', ARGV[2])
  if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('RENAME', KEYS[2], KEYS[4])
  else
    redis.call('DEL', KEYS[4])
  end
  redis.call('HSET', KEYS[4], '.generation', generation, '.get_id', get_id, '.live', ARGV[4],
    '.seed', ARGV[5], '.cursor', ARGV[6])
  redis.call('PEXPIRE', KEYS[4], ARGV[7])
end
return redis.call('HGETALL', KEYS[4])
