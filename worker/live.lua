-- The aggregator's view of the registry: the models that heartbeated since ARGV[1], and the clock
-- of the server that stamps the entry IDs, read together in one round trip.
-- KEYS[1]: <prefix>:models    ARGV[1]: the oldest heartbeat that counts (seconds since the epoch)
local now = redis.call('TIME')
return {now[1], now[2], redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')}
