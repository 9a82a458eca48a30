-- Create a PENDING promise if absent (docs/contracts.md, handling a trigger step 2).
-- KEYS[1] promise hash, KEYS[2] partition deadlines zset,
-- KEYS[3] pending_by_second hash, KEYS[4] pending_seconds zset
-- ARGV[1] id, ARGV[2] timeout relative ms (used when ARGV[3] is 0),
-- ARGV[3] timeout absolute ms or 0, ARGV[4] retention ms,
-- ARGV[5] heartbeat seconds or '', ARGV[6..] field/value pairs ('' values skipped)
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'EXISTS', redis.call('HGETALL', KEYS[1])}
end
local now = now_ms()
local timeout = tonumber(ARGV[3])
if timeout == 0 then timeout = now + tonumber(ARGV[2]) end
-- tv: the run's idempotency token is version 2, bound to 'created'.
-- Integers are written with %d: Lua prints a number of 15 digits or more as
-- 1e+17, which no reader parses back.
local fields = {'id', ARGV[1], 'state', 'PENDING', 'created', now, 'timeout', string.format('%d', timeout), 'tv', '2'}
for i = 6, #ARGV, 2 do
  if ARGV[i + 1] ~= '' then
    fields[#fields + 1] = ARGV[i]
    fields[#fields + 1] = ARGV[i + 1]
  end
end
local deadline = timeout
local hb = tonumber(ARGV[5])
if hb then
  deadline = math.min(timeout, now + hb * 1000)
  fields[#fields + 1] = 'hb'
  fields[#fields + 1] = ARGV[5]
  fields[#fields + 1] = 'hbd'
  fields[#fields + 1] = string.format('%d', deadline)
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
count_pending(KEYS[3], KEYS[4], now, 1)
-- Backstop against leaks if no reconciler ever sweeps: gone a retention
-- period after its deadline at the latest. Counted from now for a deadline
-- already past (a timeout given in seconds instead of milliseconds, say):
-- from the deadline, the key would be gone before this script returned.
redis.call('PEXPIREAT', KEYS[1], math.max(timeout, now) + tonumber(ARGV[4]))
return {'CREATED', redis.call('HGETALL', KEYS[1])}
