-- A child's outcome reaches its parent (docs/contracts.md, parent triggers).
-- Idempotent: an outcome is recorded once (HSETNX), and the answer is read
-- from what is recorded, so a repeat (the relay retrying after a crash)
-- answers the same. The parent is settled by the caller from the answer
-- (settle.lua, idempotent), never here: the join's value is built in Rust.
-- KEYS[1] parent promise, KEYS[2] its children hash, KEYS[3] the fanout schedule
-- ARGV[1] parent id, ARGV[2] child index n, ARGV[3] child id,
-- ARGV[4] child state, ARGV[5] '1' if the child has value data, ARGV[6] the data
-- Children hash: i<n> id, s<n> state, v<n> value data, done (how many
-- recorded), first (the decisive child: the first rejected under all, the
-- first resolved under any).
-- Answers: {'GONE'} | {'NOT_A_CHILD'} | {'SETTLED'} (the parent is) | {'OPEN'}
-- | {'DECISIVE', n, id, state, data|false}
-- | {'COMPLETE', id0, state0, data0|false, id1, ...} (every child recorded)
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {'GONE'} end
local kids = tonumber(redis.call('HGET', KEYS[1], 'kids'))
local n = tonumber(ARGV[2])
if not kids or not n or n >= kids or redis.call('HGET', KEYS[2], 'i' .. n) ~= ARGV[3] then
  return {'NOT_A_CHILD'}
end
if redis.call('HSETNX', KEYS[2], 's' .. n, ARGV[4]) == 1 then
  if ARGV[5] == '1' then redis.call('HSET', KEYS[2], 'v' .. n, ARGV[6]) end
  local done = redis.call('HINCRBY', KEYS[2], 'done', 1)
  local join = redis.call('HGET', KEYS[1], 'join')
  if (join == 'all' and ARGV[4] ~= 'RESOLVED') or (join == 'any' and ARGV[4] == 'RESOLVED') then
    redis.call('HSETNX', KEYS[2], 'first', n)
  end
  -- The window: as one child settles, the next may start.
  local mc = tonumber(redis.call('HGET', KEYS[1], 'mc'))
  local kl = tonumber(redis.call('HGET', KEYS[1], 'kl')) or kids
  if st == 'PENDING' and mc and kl < kids then
    local target = math.min(kids, done + mc)
    if target > kl then
      redis.call('HSET', KEYS[1], 'kl', target)
      redis.call('ZADD', KEYS[3], now_ms(), ARGV[1])
    end
  end
end
if st ~= 'PENDING' then return {'SETTLED'} end
local done = tonumber(redis.call('HGET', KEYS[2], 'done')) or 0
if done >= kids then
  local out = {'COMPLETE'}
  for i = 0, kids - 1 do
    local f = redis.call('HMGET', KEYS[2], 'i' .. i, 's' .. i, 'v' .. i)
    out[#out + 1] = f[1]
    out[#out + 1] = f[2]
    out[#out + 1] = f[3]
  end
  return out
end
local first = redis.call('HGET', KEYS[2], 'first')
if first then
  local f = redis.call('HMGET', KEYS[2], 'i' .. first, 's' .. first, 'v' .. first)
  return {'DECISIVE', first, f[1], f[2], f[3]}
end
return {'OPEN'}
