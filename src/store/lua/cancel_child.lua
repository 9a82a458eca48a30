-- Cancel one child of a settled parent (docs/contracts.md, parent triggers):
-- a pending child with a run becomes REJECTED_CANCELED with its run's
-- cancellation scheduled; a child never created is written settled, so that
-- a fan-out step arriving later finds it and launches nothing. A pending
-- child without a run is left as it is ('UNLAUNCHED'): its launch may be in
-- flight, or done by a worker that died before recording the run, and
-- settling it now would lose that run. The caller has the parent's fan-out
-- step learn the run (run-now again with the child's token) first.
-- Idempotent.
-- KEYS: the child's promise, deadlines, outbox, runs, polls, cancels,
-- pending_by_second, pending_seconds, settled_in_minute, settled_order
-- ARGV[1] child id, ARGV[2] value JSON, ARGV[3] retention ms,
-- ARGV[4] parent id, ARGV[5] child index
local st = redis.call('HGET', KEYS[1], 'state')
local now = now_ms()
if st == 'PENDING' and not redis.call('HGET', KEYS[1], 'run_id') then
  return {'UNLAUNCHED'}
end
if st == 'PENDING' then
  settle_record(KEYS, ARGV[1], 'REJECTED_CANCELED', ARGV[2], '', 'parent', ARGV[3], now, true)
  return {'CANCELED'}
end
if st then return {'ALREADY', st} end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'state', 'PENDING', 'created', now,
  'timeout', string.format('%d', now), 'tv', '3', 'par', ARGV[4], 'pn', ARGV[5])
settle_record(KEYS, ARGV[1], 'REJECTED_CANCELED', ARGV[2], '', 'parent', ARGV[3], now, false, true)
return {'WRITTEN'}
