-- An attempt failed and the promise's policy retries it (docs/contracts.md,
-- retries): the promise stays PENDING, the failed attempt is appended to its
-- attempts, and the next attempt is scheduled. Only for the attempt the
-- caller saw: a second report of the same failure (the notebook's reject,
-- then the reconciler seeing the run end) changes nothing.
-- KEYS: promise, deadlines, polls, retries, runs
-- ARGV[1] id, ARGV[2] attempt, ARGV[3] the failed attempt as a JSON object,
-- ARGV[4] delay ms before the next attempt
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {'NOT_FOUND'} end
if st ~= 'PENDING' then return {'SETTLED', st} end
local an = tonumber(redis.call('HGET', KEYS[1], 'an') or '1')
if an ~= tonumber(ARGV[2]) or redis.call('HEXISTS', KEYS[1], 'rw') == 1
    or redis.call('HEXISTS', KEYS[1], 'rl') == 1 then
  return {'STALE', st}
end
local now = now_ms()
local due = now + tonumber(ARGV[4])
-- Appended as text: a JSON round trip in Lua would print run ids of 15
-- digits or more as 1e+15.
local failed = redis.call('HGET', KEYS[1], 'ah')
if failed then
  failed = string.sub(failed, 1, -2) .. ',' .. ARGV[3] .. ']'
else
  failed = '[' .. ARGV[3] .. ']'
end
redis.call('HSET', KEYS[1], 'ah', failed, 'rw', string.format('%d', due))
local run = redis.call('HGET', KEYS[1], 'run_id')
if run then redis.call('HDEL', KEYS[5], run) end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], due, ARGV[1])
-- Nothing heartbeats while waiting: the heartbeat deadline counts from
-- when the next attempt is due.
local hb = tonumber(redis.call('HGET', KEYS[1], 'hb'))
if hb then
  local timeout = tonumber(redis.call('HGET', KEYS[1], 'timeout'))
  local hbd = math.min(timeout, due + hb * 1000)
  redis.call('HSET', KEYS[1], 'hbd', string.format('%d', hbd))
  redis.call('ZADD', KEYS[2], hbd, ARGV[1])
end
return {'WAITING', st}
