-- Create a parent promise if absent (docs/contracts.md, parent triggers):
-- the promise as create.lua makes it, its children's ids in its children
-- hash (i<n> -> id), and its first fan-out step scheduled.
-- KEYS[1..4] as create.lua, KEYS[5] the parent's children hash,
-- KEYS[6] the partition's fanout schedule
-- ARGV[1..5] as create.lua, ARGV[6] delay ms before the fan-out schedule
-- takes the first step (the worker that created it takes it at once),
-- ARGV[7] number of children n, ARGV[8..7+n] their ids, then field/value pairs
local n = tonumber(ARGV[7])
local reply, backstop = create_record(KEYS, ARGV, 8 + n)
if backstop then
  local ids = {}
  for i = 0, n - 1 do
    ids[#ids + 1] = 'i' .. i
    ids[#ids + 1] = ARGV[8 + i]
  end
  -- HSET in slices: unpack has a limit on how many values it spreads.
  for i = 1, #ids, 1000 do
    redis.call('HSET', KEYS[5], unpack(ids, i, math.min(i + 999, #ids)))
  end
  redis.call('PEXPIREAT', KEYS[5], backstop)
  redis.call('ZADD', KEYS[6], now_ms() + tonumber(ARGV[6]), ARGV[1])
end
return reply
