-- Attempt n has its run (docs/contracts.md, retries): a new run (rerun) or
-- a repair of the same run (repair), after attempt_begin.lua. Idempotent:
-- the same attempt with the same run again is OK. A promise settled while
-- the attempt was starting (timed out, cancelled, or resolved by the new
-- run's callback before this) keeps the run on its record, and a run
-- nobody waits for any more is cancelled.
-- KEYS: promise, runs, polls, retries, deadlines, cancels
-- ARGV[1] id, ARGV[2] attempt, ARGV[3] run id, ARGV[4] repair id or '',
-- ARGV[5] first poll delay ms
local st = redis.call('HGET', KEYS[1], 'state')
if not st then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return {'NOT_FOUND'}
end
local n = tonumber(ARGV[2])
local an = tonumber(redis.call('HGET', KEYS[1], 'an') or '1')
local launching = redis.call('HEXISTS', KEYS[1], 'rl') == 1
if an == n and not launching and redis.call('HGET', KEYS[1], 'run_id') == ARGV[3] then
  return {'OK', st}
end
if an ~= n or not launching then return {'STALE', st} end
local now = now_ms()
redis.call('HSET', KEYS[1], 'run_id', ARGV[3], 'la', now)
redis.call('HDEL', KEYS[1], 'rl')
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'rp', ARGV[4]) end
redis.call('ZREM', KEYS[4], ARGV[1])
if st ~= 'PENDING' then
  if st ~= 'RESOLVED' then
    redis.call('ZADD', KEYS[6], now, ARGV[3] .. ':' .. (redis.call('HGET', KEYS[1], 'ws') or 'default'))
  end
  return {'SETTLED', st}
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[1])
local hb = tonumber(redis.call('HGET', KEYS[1], 'hb'))
if hb then
  local timeout = tonumber(redis.call('HGET', KEYS[1], 'timeout'))
  local hbd = math.min(timeout, now + hb * 1000)
  redis.call('HSET', KEYS[1], 'hbd', string.format('%d', hbd))
  redis.call('ZADD', KEYS[5], hbd, ARGV[1])
end
return {'OK', st}
