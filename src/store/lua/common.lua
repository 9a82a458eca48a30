-- Shared by every script (prepended at load time).

-- Redis's own clock, so all processes agree on "now" whatever their host clocks say.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Pending promises per creation second (for the oldest pending age): +1 at
-- create, -1 at settle; a second whose count reaches 0 is removed from both.
local function count_pending(counts, seconds, created_ms, delta)
  local s = math.floor(created_ms / 1000)
  local n = redis.call('HINCRBY', counts, s, delta)
  if n <= 0 then
    redis.call('HDEL', counts, s)
    redis.call('ZREM', seconds, s)
  elseif delta > 0 and n == delta then
    redis.call('ZADD', seconds, s, s)
  end
end

-- The one way a promise becomes settled: state, value and who did it; out of
-- the deadline, poll and run indexes; expiry set to the retention; one outbox
-- entry (the record minus its param); and, if asked and there is a run, a
-- cancellation scheduled; the pending count of its creation second less one.
-- k = {promise, deadlines, outbox, runs, polls, cancels, pending_by_second,
-- pending_seconds, settled_in_minute}. Only ever called on a PENDING promise.
local function settle_record(k, id, state, value, iku, by, retention, now, cancel_run)
  local created = tonumber(redis.call('HGET', k[1], 'created'))
  if created then count_pending(k[7], k[8], created, -1) end
  redis.call('HSET', k[1], 'state', state, 'value', value, 'completed', now, 'by', by)
  if iku ~= '' then redis.call('HSET', k[1], 'iku', iku) end
  redis.call('ZREM', k[2], id)
  redis.call('ZREM', k[5], id)
  local run = redis.call('HGET', k[1], 'run_id')
  if run then
    redis.call('HDEL', k[4], run)
    if cancel_run then
      redis.call('ZADD', k[6], now, run .. ':' .. (redis.call('HGET', k[1], 'ws') or 'default'))
    end
  end
  redis.call('PEXPIRE', k[1], retention)
  redis.call('HINCRBY', k[9], state, 1)
  redis.call('EXPIRE', k[9], 7200)
  local all = redis.call('HGETALL', k[1])
  local entry = {}
  for i = 1, #all, 2 do
    if all[i] ~= 'param' then
      entry[#entry + 1] = all[i]
      entry[#entry + 1] = all[i + 1]
    end
  end
  redis.call('XADD', k[3], '*', unpack(entry))
  return all
end
