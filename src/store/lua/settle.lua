-- Settle a promise and write its outbox entry in the same step (docs/contracts.md, the HTTP API),
-- following the Durable Promise specification's idempotency table.
-- KEYS: promise, deadlines, outbox, runs, polls, cancels, pending_by_second,
-- pending_seconds, settled_in_minute, settled_order
-- ARGV[1] id, ARGV[2] target state, ARGV[3] value JSON, ARGV[4] idempotency key or '',
-- ARGV[5] strict '1'/'0', ARGV[6] settled_by, ARGV[7] retention ms,
-- ARGV[8] value JSON used if the promise turns out to be past its timeout,
-- ARGV[9] '1' to cancel the run (REJECTED_CANCELED), ARGV[10] the caller's
-- capability (`state_if_opened`, common.lua): checked before anything is said of the
-- promise, so a token of an earlier incarnation learns nothing of this one
local st, opened = state_if_opened(KEYS[1], ARGV[10])
if not st then return {'NOT_FOUND'} end
if not opened then return {'NOT_OPENED'} end
if st ~= 'PENDING' then
  local iku = redis.call('HGET', KEYS[1], 'iku')
  local strict = ARGV[5] == '1'
  if ARGV[4] ~= '' and iku == ARGV[4] and ((not strict) or st == ARGV[2]) then
    return {'DEDUP', redis.call('HGETALL', KEYS[1])}
  end
  if st == 'REJECTED_TIMEDOUT' and not strict then
    return {'DEDUP', redis.call('HGETALL', KEYS[1])}
  end
  return {'ALREADY', redis.call('HGETALL', KEYS[1])}
end
local now = now_ms()
local timeout = tonumber(redis.call('HGET', KEYS[1], 'timeout'))
if ARGV[2] ~= 'REJECTED_TIMEDOUT' and timeout and now >= timeout then
  -- Past its deadline: the promise is timed out, whatever was asked.
  local cot = redis.call('HGET', KEYS[1], 'cot') ~= '0'
  return {'TIMEDOUT', settle_record(KEYS, ARGV[1], 'REJECTED_TIMEDOUT', ARGV[8], '', 'timeout', ARGV[7], now, cot)}
end
return {'SETTLED', settle_record(KEYS, ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[6], ARGV[7], now, ARGV[9] == '1')}
