-- Up to ARGV[1] members of a schedule that are due now (by Redis's clock).
-- Reads only what is due: the cost follows the number due, not the size.
-- KEYS[1] the schedule
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
