-- Mark worker ARGV[1] live for ARGV[2] ms, forget workers silent for longer,
-- and return how many are live. ARGV[2] = "leave": remove ARGV[1] instead.
-- KEYS[1] the member set (name -> until when it counts as live)
local now = now_ms()
if ARGV[2] == 'leave' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
