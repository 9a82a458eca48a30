-- Open a console session.
-- KEYS[1] session hash; ARGV[1] csrf, ARGV[2] operator fingerprint,
-- ARGV[3] idle ms, ARGV[4] absolute ms
local expires = now_ms() + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'csrf', ARGV[1], 'op', ARGV[2], 'expires', string.format('%d', expires))
redis.call('PEXPIRE', KEYS[1], math.min(tonumber(ARGV[3]), tonumber(ARGV[4])))
return 'OK'
