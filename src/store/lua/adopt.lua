-- An operator adopts a run started outside runbridge for a pending promise
-- (docs/contracts.md, adoption): the promise follows that run from now on,
-- as if runbridge had launched it (checks, deadline, exit value, the event's
-- run id). A run it followed before stays in its attempts (ended, or an
-- orphan for the audit to cancel); a retry it was waiting for is off.
-- Adopting the run it already follows is OK again.
-- KEYS: promise, runs, polls, retries
-- ARGV[1] id, ARGV[2] run id, ARGV[3] first poll delay ms, ARGV[4] the
-- previous run's attempt entry as a JSON object, with ATTEMPT and RUN where
-- its attempt number and run id go (written as text: see attempt_failed.lua)
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {'NOT_FOUND'} end
if st ~= 'PENDING' then return {'SETTLED', st} end
local cur = redis.call('HGET', KEYS[1], 'run_id')
if cur == ARGV[2] then return {'OK', st} end
if redis.call('HEXISTS', KEYS[1], 'rl') == 1 then return {'LAUNCHING', st} end
local owner = redis.call('HGET', KEYS[2], ARGV[2])
if owner and owner ~= ARGV[1] then return {'TAKEN', owner} end
local now = now_ms()
local an = tonumber(redis.call('HGET', KEYS[1], 'an') or '1')
local waiting = redis.call('HEXISTS', KEYS[1], 'rw') == 1
if cur then
  local entry = string.gsub(string.gsub(ARGV[4], 'ATTEMPT', tostring(an)), 'RUN', cur)
  local hist = redis.call('HGET', KEYS[1], 'ah')
  if hist then
    hist = string.sub(hist, 1, -2) .. ',' .. entry .. ']'
  else
    hist = '[' .. entry .. ']'
  end
  redis.call('HSET', KEYS[1], 'ah', hist)
  redis.call('HDEL', KEYS[2], cur)
end
if cur or waiting then
  -- The adopted run is the next attempt.
  redis.call('HSET', KEYS[1], 'an', an + 1)
end
redis.call('HDEL', KEYS[1], 'rw', 'url', 'rp')
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HSET', KEYS[1], 'run_id', ARGV[2], 'la', now)
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
return {'OK', st}
