-- A generation's one SET (see generation.py), sent at most once: the generation's key records its
-- ID with what the generation decided, so an evolution restarted after sending it, or redis-py
-- resending this script after a lost reply, gets that ID back and only waits for the
-- acknowledgements. If the key is gone, the generation outlived the models' pause: they train on,
-- and a SET now would overwrite what they learned since, so none is sent (nil).
-- KEYS: evolution stream, the generation's key.
-- ARGV: the GET's ID, maxlen, the SET entry's data, the weights stream's last ID, the outcome
-- (JSON), the key's lifetime (ms).
local recorded = redis.call('HMGET', KEYS[2], '.get_id', '.set_id', '.set_cursor')
if recorded[1] ~= ARGV[1] then
  return nil
end
if recorded[2] then
  return {recorded[2], recorded[3]}
end
local set_id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[3])
redis.call('HSET', KEYS[2], '.set_id', set_id, '.set_cursor', ARGV[4], '.outcome', ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return {set_id, ARGV[4]}
