-- Shared by every script (prepended at load time).

-- Redis's own clock, so all processes agree on "now" whatever their host clocks say.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The one way a promise becomes settled: state, value and who did it; out of
-- the deadline, poll and run indexes; expiry set to the retention; one outbox
-- entry (the record minus its param); and, if asked and there is a run, a
-- cancellation scheduled. k = {promise, deadlines, outbox, runs, polls, cancels}.
local function settle_record(k, id, state, value, iku, by, retention, now, cancel_run)
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
