-- A progress update from the notebook (docs/contracts.md, progress): a
-- heartbeat; stored as the latest (pg, numbered pgn) and in the recent
-- history (pgh, the last ARGV[4]); and published as a promise.progress
-- event through the outbox, at most one per ARGV[3] ms: the first at once,
-- later ones when the interval since the last is over (pgq: one is
-- scheduled), carrying the latest update then. Never after settlement.
-- KEYS: promise, deadlines, outbox, progress schedule
-- ARGV[1] id, ARGV[2] the update's fields as JSON object members (or ''),
-- ARGV[3] interval ms, ARGV[4] history length, ARGV[5] the caller's
-- capability (`state_if_opened`, common.lua)
local st, opened = state_if_opened(KEYS[1], ARGV[5])
if not st then return {'NOT_FOUND'} end
if not opened then return {'NOT_OPENED'} end
if st ~= 'PENDING' then return {'SETTLED', st} end
local now = now_ms()
local hb = tonumber(redis.call('HGET', KEYS[1], 'hb'))
if hb then
  local timeout = tonumber(redis.call('HGET', KEYS[1], 'timeout'))
  local deadline = math.min(timeout, now + hb * 1000)
  redis.call('HSET', KEYS[1], 'hbd', deadline)
  redis.call('ZADD', KEYS[2], deadline, ARGV[1])
end
redis.call('HSET', KEYS[1], 'hbl', now)
redis.call('HINCRBY', KEYS[1], 'hbn', 1)
local seq = redis.call('HINCRBY', KEYS[1], 'pgn', 1)
local head = '{"seq":' .. seq .. ',"at":' .. string.format('%d', now)
local latest = head .. '}'
if ARGV[2] ~= '' then latest = head .. ',' .. ARGV[2] .. '}' end
local history = cjson.decode(redis.call('HGET', KEYS[1], 'pgh') or '[]')
history[#history + 1] = cjson.decode(latest)
while #history > tonumber(ARGV[4]) do table.remove(history, 1) end
redis.call('HSET', KEYS[1], 'pg', latest, 'pgh', cjson.encode(history))
if redis.call('HEXISTS', KEYS[1], 'pgq') == 0 then
  local due = tonumber(redis.call('HGET', KEYS[1], 'pge') or '0') + tonumber(ARGV[3])
  if now >= due then
    emit_progress(KEYS[1], KEYS[3], now)
  else
    redis.call('HSET', KEYS[1], 'pgq', '1')
    redis.call('ZADD', KEYS[4], due, ARGV[1])
  end
end
return {'OK', seq}
