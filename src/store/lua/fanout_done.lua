-- A fan-out step finished (docs/contracts.md, parent triggers).
-- A pending parent leaves the fanout schedule unless its window grew
-- meanwhile (a child settled: the next step is due). A parent that settled
-- while a step for its window ran is scheduled again at once: that step
-- may have launched a child after the parent's children were cancelled,
-- and only a settled parent's own step (ARGV[3] '1', once none of its
-- children is pending without a recorded run) lets it go.
-- KEYS[1] parent promise, KEYS[2] fanout schedule
-- ARGV[1] parent id, ARGV[2] the window (kl) the step worked on,
-- ARGV[3] '1' from a settled parent's step
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'PENDING' then
  if redis.call('HGET', KEYS[1], 'kl') ~= ARGV[2] then return 0 end
elseif st and ARGV[3] ~= '1' then
  redis.call('ZADD', KEYS[2], now_ms(), ARGV[1])
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
