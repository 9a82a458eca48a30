-- A scheduled progress event is due (progress.lua): published with the
-- latest update if the promise is still PENDING, else dropped.
-- KEYS: promise, outbox, progress schedule; ARGV[1] id
redis.call('ZREM', KEYS[3], ARGV[1])
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 0 end
redis.call('HDEL', KEYS[1], 'pgq')
if st ~= 'PENDING' then return 0 end
emit_progress(KEYS[1], KEYS[2], now_ms())
return 1
