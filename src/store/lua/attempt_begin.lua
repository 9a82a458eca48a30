-- The next attempt starts (docs/contracts.md, retries): before its run is
-- launched, the promise moves to it (an = n, rl set, rw gone), so a
-- callback from the new run, which may come before the run is recorded,
-- settles a promise that already counts the attempt. A rerun's new run
-- replaces the old one (run_id and its page cleared); a repair keeps the
-- run and the latest repair recorded (rp), which the repair sends as
-- latest_repair_id. Repeated (a step after a crash): OK again. The retries
-- entry stays until attempt_started.lua, so a worker dying between brings
-- the step back.
-- KEYS: promise; ARGV[1] id, ARGV[2] attempt n, ARGV[3] '1' for a rerun
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {'NOT_FOUND'} end
if st ~= 'PENDING' then return {'SETTLED', st} end
local n = tonumber(ARGV[2])
local an = tonumber(redis.call('HGET', KEYS[1], 'an') or '1')
if an == n and redis.call('HEXISTS', KEYS[1], 'rl') == 1 then return {'OK', st} end
if an ~= n - 1 or redis.call('HEXISTS', KEYS[1], 'rw') == 0 then return {'STALE', st} end
redis.call('HSET', KEYS[1], 'an', n, 'rl', '1')
redis.call('HDEL', KEYS[1], 'rw')
if ARGV[3] == '1' then redis.call('HDEL', KEYS[1], 'run_id', 'url', 'rp', 'la') end
return {'OK', st}
