-- Acknowledge and delete a published outbox entry in one step, so the stream
-- holds only what is not yet confirmed by the broker.
-- With KEYS[2] (the promise, when its event was confirmed), the promise
-- records the time (field 'pub') if it still exists; its expiry is kept.
-- KEYS[1] outbox stream, KEYS[2] promise hash (optional); ARGV[1] group, ARGV[2] entry id
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'pub', now_ms())
end
return redis.call('XDEL', KEYS[1], ARGV[2])
