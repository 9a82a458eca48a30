-- Take up to ARGV[1] members of a schedule (sorted set scored by due time)
-- that are due, and push each one ARGV[2] ms into the future, so that another
-- worker does not take it meanwhile. What is not finished comes due again.
-- KEYS[1] the schedule
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), m)
end
return due
