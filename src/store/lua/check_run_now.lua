-- The audit found a pending promise whose run ended long ago or is gone
-- (docs/operating.md, the audit): its run check is made due now, and put
-- back on the schedule if it fell off, so the reconciler settles it from
-- its run as it settles every other.
-- KEYS: promise, polls; ARGV[1] id
if redis.call('HGET', KEYS[1], 'state') ~= 'PENDING' then return 0 end
if not redis.call('HGET', KEYS[1], 'run_id') then return 0 end
redis.call('ZADD', KEYS[2], now_ms(), ARGV[1])
return 1
