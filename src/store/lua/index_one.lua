-- Put one promise stored before searches had indexes into them (see
-- RedisStore::index_existing). Idempotent; reads the record in the same
-- step, so a promise settled meanwhile lands in the right index.
-- KEYS[1] promise, KEYS[2] pending_by_second, KEYS[3] pending_seconds,
-- KEYS[4] settled_order
-- ARGV[1] id, ARGV[2] retention ms
local f = redis.call('HMGET', KEYS[1], 'state', 'created', 'completed')
if not f[1] then return 0 end
bump_version(KEYS[1])
if f[1] == 'PENDING' then
  local created = tonumber(f[2])
  if not created then return 0 end
  local s = math.floor(created / 1000)
  -- The count of its second is there already (counted at creation).
  redis.call('HSET', KEYS[2] .. ':' .. s, ARGV[1], '')
  redis.call('ZADD', KEYS[3], s, s)
  return 1
end
local done = tonumber(f[3])
if not done or done < now_ms() - tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[4], done, ARGV[1])
return 1
