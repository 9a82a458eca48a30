-- An operator asks for the next attempt now: only a promise waiting for it.
-- KEYS: promise, retries; ARGV[1] id
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {'NOT_FOUND'} end
if st ~= 'PENDING' or redis.call('HEXISTS', KEYS[1], 'rw') == 0 then
  return {'NOT_WAITING', st}
end
local now = now_ms()
redis.call('HSET', KEYS[1], 'rw', now)
redis.call('ZADD', KEYS[2], now, ARGV[1])
return {'OK', st}
