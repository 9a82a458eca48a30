-- A fan-out step finished: the parent leaves the fanout schedule, unless its
-- window grew meanwhile (a child settled: the next step is due) and it is
-- still pending.
-- KEYS[1] parent promise, KEYS[2] fanout schedule
-- ARGV[1] parent id, ARGV[2] the window (kl) the step worked on
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'PENDING' and redis.call('HGET', KEYS[1], 'kl') ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
