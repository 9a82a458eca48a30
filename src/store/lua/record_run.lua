-- Record the Databricks run of a promise (docs/contracts.md, handling a trigger step 5). Idempotent:
-- the same run id again is OK; a different one is a conflict and changes nothing.
-- Recorded even on a settled promise (a callback may win the race): then, if
-- the promise was cancelled or timed out with cancel_on_timeout, the run is
-- scheduled for cancellation. A pending promise is indexed in the runs hash
-- and scheduled for its first poll.
-- KEYS: promise, runs, polls, cancels
-- ARGV[1] run id, ARGV[2] run page url or '', ARGV[3] promise id, ARGV[4] first poll delay ms
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {'NOT_FOUND'} end
local cur = redis.call('HGET', KEYS[1], 'run_id')
if cur and cur ~= ARGV[1] then return {'CONFLICT', cur} end
if cur and ARGV[2] ~= '' and not redis.call('HGET', KEYS[1], 'url') then
  -- The run's page, learnt at its first check (run-now answers only the id).
  redis.call('HSET', KEYS[1], 'url', ARGV[2])
end
if not cur then
  local now = now_ms()
  redis.call('HSET', KEYS[1], 'run_id', ARGV[1], 'la', now)
  if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'url', ARGV[2]) end
  if st == 'PENDING' then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[3])
  elseif st == 'REJECTED_CANCELED' or (st == 'REJECTED_TIMEDOUT' and redis.call('HGET', KEYS[1], 'cot') ~= '0') then
    redis.call('ZADD', KEYS[4], now, ARGV[1] .. ':' .. (redis.call('HGET', KEYS[1], 'ws') or 'default'))
  end
end
return {'OK', st}
