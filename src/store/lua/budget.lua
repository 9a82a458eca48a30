-- A token bucket shared by every worker (per workspace and call class), and
-- a workspace-wide pause set after a 429. Returns 0 when a request may go
-- now (a token was taken), else how many ms to wait before asking again.
-- KEYS[1] bucket hash, KEYS[2] pause key (same hash tag: one slot)
-- ARGV[1] rate per second, ARGV[2] burst
local pttl = redis.call('PTTL', KEYS[2])
if pttl > 0 then return pttl end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
-- Unlimited rate: only the pause applies.
if rate <= 0 then return 0 end
local now = now_ms()
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], 60000)
return wait
