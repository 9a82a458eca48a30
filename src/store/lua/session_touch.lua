-- Use a console session: its idle expiry moves on, never past its absolute one.
-- KEYS[1] session hash; ARGV[1] idle ms
-- Returns {csrf, operator fingerprint}, or false when there is no live session.
local f = redis.call('HMGET', KEYS[1], 'csrf', 'op', 'expires')
if not f[1] or not f[3] then return false end
local left = tonumber(f[3]) - now_ms()
if not left or left <= 0 then
  redis.call('DEL', KEYS[1])
  return false
end
redis.call('PEXPIRE', KEYS[1], math.min(left, tonumber(ARGV[1])))
return {f[1], f[2]}
