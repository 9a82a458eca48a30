-- Move a member of a schedule to ARGV[2] ms from now, only if it is still
-- there (a settlement removes it; it must not come back).
-- KEYS[1] the schedule; ARGV[1] member, ARGV[2] delay ms
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', now_ms() + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
