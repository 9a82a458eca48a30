-- Push the heartbeat deadline forward, never past the overall timeout.
-- KEYS[1] promise hash, KEYS[2] deadlines zset; ARGV[1] id, ARGV[2] the
-- caller's capability (`state_if_opened`, common.lua)
local st, opened = state_if_opened(KEYS[1], ARGV[2])
if not st then return {'NOT_FOUND'} end
if not opened then return {'NOT_OPENED'} end
if st ~= 'PENDING' then return {'SETTLED', redis.call('HGETALL', KEYS[1])} end
local hb = tonumber(redis.call('HGET', KEYS[1], 'hb'))
if hb then
  local timeout = tonumber(redis.call('HGET', KEYS[1], 'timeout'))
  local deadline = math.min(timeout, now_ms() + hb * 1000)
  redis.call('HSET', KEYS[1], 'hbd', deadline)
  redis.call('ZADD', KEYS[2], deadline, ARGV[1])
end
-- For the console's timeline: the last heartbeat and how many.
redis.call('HSET', KEYS[1], 'hbl', now_ms())
redis.call('HINCRBY', KEYS[1], 'hbn', 1)
return {'OK', redis.call('HGETALL', KEYS[1])}
