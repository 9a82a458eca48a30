-- The deadline sweep's transition: a PENDING promise past its timeout or its
-- heartbeat deadline becomes REJECTED_TIMEDOUT (settled_by timeout) and, with
-- cancel_on_timeout, its run is scheduled for cancellation. A promise that is
-- not due after all (a heartbeat moved it) gets its deadline score corrected.
-- KEYS: promise, deadlines, outbox, runs, polls, cancels, pending_by_second,
-- pending_seconds, settled_in_minute, settled_order
-- ARGV[1] id, ARGV[2] retention ms
local st = redis.call('HGET', KEYS[1], 'state')
if not st then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'GONE'}
end
if st ~= 'PENDING' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'SETTLED'}
end
local now = now_ms()
local timeout = tonumber(redis.call('HGET', KEYS[1], 'timeout'))
local hbd = tonumber(redis.call('HGET', KEYS[1], 'hbd'))
local which
if timeout <= now then
  which = 'timeout'
elseif hbd and hbd <= now then
  which = 'heartbeat'
else
  local d = timeout
  if hbd and hbd < d then d = hbd end
  redis.call('ZADD', KEYS[2], d, ARGV[1])
  return {'NOT_DUE'}
end
local message
if which == 'timeout' then
  message = 'the promise passed its timeout'
else
  message = 'no heartbeat within heartbeat_seconds (' .. (redis.call('HGET', KEYS[1], 'hb') or '?') .. ' s)'
end
local value = cjson.encode({headers = {}, data = cjson.encode({reason = which, message = message})})
local cot = redis.call('HGET', KEYS[1], 'cot') ~= '0'
return {'TIMEDOUT', settle_record(KEYS, ARGV[1], 'REJECTED_TIMEDOUT', value, '', 'timeout', ARGV[2], now, cot)}
