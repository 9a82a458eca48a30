-- Mark worker ARGV[1] live for ARGV[2] ms, holding ARGV[3] partitions;
-- forget workers silent for longer. Returns {live workers, fewest
-- partitions a live worker holds}. ARGV[2] = "leave": remove ARGV[1].
-- KEYS[1] the member set (name -> until when it counts as live)
-- KEYS[2] partitions held (name -> count)
local now = now_ms()
if ARGV[2] == 'leave' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return {0, 0}
end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
local fewest = nil
for _, n in ipairs(redis.call('HVALS', KEYS[2])) do
  n = tonumber(n)
  if fewest == nil or n < fewest then fewest = n end
end
return {redis.call('ZCARD', KEYS[1]), fewest or 0}
