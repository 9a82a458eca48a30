-- Take a partition's lease if it is free, or renew it if ARGV[1] holds it
-- (for ARGV[2] ms either way). 1: held by ARGV[1]; 0: another worker's.
-- ARGV[3] = "release": give it back instead, if ARGV[1] holds it.
-- KEYS[1] the lease
local owner = redis.call('GET', KEYS[1])
if ARGV[3] == 'release' then
  if owner == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
if not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
return 0
