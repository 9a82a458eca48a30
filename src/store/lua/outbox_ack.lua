-- Acknowledge and delete a published outbox entry in one step, so the stream
-- holds only what is not yet confirmed by the broker.
-- KEYS[1] outbox stream; ARGV[1] group, ARGV[2] entry id
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
