-- Shared by every script (prepended at load time).

-- Redis's own clock, so all processes agree on "now" whatever their host clocks say.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The promise's state (false: no such promise), and whether the caller's
-- capability opens this incarnation of it (domain::ids, CallbackToken), in
-- one read. bound: '' no token (an operator, the bridge itself); 'v1' a
-- token of the id alone, which opens only promises created before tokens
-- were bound (token version below 3); else the creation ms a token is bound to.
local function state_if_opened(promise, bound)
  local f = redis.call('HMGET', promise, 'state', 'tv', 'created')
  if not f[1] or bound == '' then return f[1], true end
  if bound == 'v1' then return f[1], (tonumber(f[2]) or 1) < 3 end
  return f[1], tonumber(f[3]) == tonumber(bound)
end

-- The partition's version: +1 at every change of what a search sees of
-- its promises (a promise created, settled or indexed), so a search that
-- read several partitions can tell whether one changed while it read the
-- others (RedisStore::search_indexes). Its key, `<prefix>:{p<N>}:version`,
-- is named from a key of the partition: its hash tag ends at the first '}'
-- (plain find: no pattern), and it shares the slot.
local function version_key(partition_key)
  local close = string.find(partition_key, '}', 1, true)
  return string.sub(partition_key, 1, close) .. ':version'
end

local function bump_version(partition_key)
  redis.call('INCR', version_key(partition_key))
end

-- Pending promises per creation second: their count (for the oldest
-- pending age and the console's ages) and their ids (searches walk them in
-- creation order), +1 at create, -1 at settle; a second whose count reaches
-- 0 is removed from all three. The ids of second s are the hash
-- `<counts>:<s>` (field id, empty value): a small hash is a listpack, a few
-- bytes more than the id each, where a sorted-set entry costs over a hundred.
local function count_pending(counts, seconds, created_ms, id, delta)
  local s = math.floor(created_ms / 1000)
  local ids = counts .. ':' .. s
  if delta > 0 then
    redis.call('HSET', ids, id, '')
  else
    redis.call('HDEL', ids, id)
  end
  local n = redis.call('HINCRBY', counts, s, delta)
  if n <= 0 then
    redis.call('HDEL', counts, s)
    redis.call('ZREM', seconds, s)
    redis.call('DEL', ids)
  elseif delta > 0 and n == delta then
    redis.call('ZADD', seconds, s, s)
  end
end

-- A promise.progress outbox entry: the record as it is now, minus its
-- param and progress history (the relay builds the event from the latest
-- update, pg); pge remembers when, for the interval.
local function emit_progress(promise, outbox, now)
  redis.call('HSET', promise, 'pge', now)
  local all = redis.call('HGETALL', promise)
  local entry = {}
  for i = 1, #all, 2 do
    if all[i] ~= 'param' and all[i] ~= 'pgh' and all[i] ~= 'ah' then
      entry[#entry + 1] = all[i]
      entry[#entry + 1] = all[i + 1]
    end
  end
  redis.call('XADD', outbox, '*', unpack(entry))
end

-- The one way a promise becomes settled: state, value and who did it; out of
-- the deadline, poll and run indexes and into the settled order; expiry set
-- to the retention; one outbox
-- entry (the record minus its param); and, if asked and there is a run, a
-- cancellation scheduled; the pending count of its creation second less one.
-- k = {promise, deadlines, outbox, runs, polls, cancels, pending_by_second,
-- pending_seconds, settled_in_minute, settled_order}. Only ever called on a PENDING promise,
-- or with `uncounted` on a record written settled (a child cancelled before
-- it was ever created), which no pending count includes.
local function settle_record(k, id, state, value, iku, by, retention, now, cancel_run, uncounted)
  -- A progress event held back by its interval goes out now, before the
  -- settlement's: the last one carries the latest update, none follows.
  if redis.call('HEXISTS', k[1], 'pgq') == 1 then
    redis.call('HDEL', k[1], 'pgq')
    emit_progress(k[1], k[3], now)
  end
  bump_version(k[1])
  local created = tonumber(redis.call('HGET', k[1], 'created'))
  if created and not uncounted then count_pending(k[7], k[8], created, id, -1) end
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
  -- Searches find settled promises here, by settlement time; an entry
  -- leaves when its record does (the same retention).
  redis.call('ZADD', k[10], now, id)
  redis.call('ZREMRANGEBYSCORE', k[10], '-inf', '(' .. string.format('%d', now - tonumber(retention)))
  redis.call('HINCRBY', k[9], state, 1)
  redis.call('EXPIRE', k[9], 7200)
  local all = redis.call('HGETALL', k[1])
  local entry = {}
  for i = 1, #all, 2 do
    if all[i] ~= 'param' and all[i] ~= 'pgh' then
      entry[#entry + 1] = all[i]
      entry[#entry + 1] = all[i + 1]
    end
  end
  redis.call('XADD', k[3], '*', unpack(entry))
  return all
end

-- Create a PENDING promise if absent (docs/contracts.md, handling a trigger
-- step 2): k = {promise, deadlines, pending_by_second, pending_seconds};
-- a[1] id, a[2] timeout relative ms (used when a[3] is 0), a[3] timeout
-- absolute ms or 0, a[4] retention ms, a[5] heartbeat seconds or '', and
-- field/value pairs from a[first] on ('' values skipped).
-- Returns the reply and, when created, the record's backstop expiry (ms).
-- The reply is {'EXISTS', record}, or {'CREATED', created, timeout}: the
-- caller sent every other field a reader uses, so it is not read back.
local function create_record(k, a, first)
  if redis.call('EXISTS', k[1]) == 1 then
    return {'EXISTS', redis.call('HGETALL', k[1])}, nil
  end
  local now = now_ms()
  local timeout = tonumber(a[3])
  if timeout == 0 then timeout = now + tonumber(a[2]) end
  -- tv: 3, the run's idempotency token is version 2 and the capability
  -- token is bound to 'created' (domain::ids, CallbackToken).
  -- Integers are written with %d: Lua prints a number of 15 digits or more as
  -- 1e+17, which no reader parses back.
  local fields = {'id', a[1], 'state', 'PENDING', 'created', now, 'timeout', string.format('%d', timeout), 'tv', '3'}
  for i = first, #a, 2 do
    if a[i + 1] ~= '' then
      fields[#fields + 1] = a[i]
      fields[#fields + 1] = a[i + 1]
    end
  end
  local deadline = timeout
  local hb = tonumber(a[5])
  if hb then
    deadline = math.min(timeout, now + hb * 1000)
    fields[#fields + 1] = 'hb'
    fields[#fields + 1] = a[5]
    fields[#fields + 1] = 'hbd'
    fields[#fields + 1] = string.format('%d', deadline)
  end
  redis.call('HSET', k[1], unpack(fields))
  bump_version(k[1])
  redis.call('ZADD', k[2], deadline, a[1])
  count_pending(k[3], k[4], now, a[1], 1)
  -- Backstop against leaks if no reconciler ever sweeps: gone a retention
  -- period after its deadline at the latest. Counted from now for a deadline
  -- already past (a timeout given in seconds instead of milliseconds, say):
  -- from the deadline, the key would be gone before this script returned.
  local backstop = math.max(timeout, now) + tonumber(a[4])
  redis.call('PEXPIREAT', k[1], backstop)
  return {'CREATED', now, string.format('%d', timeout)}, backstop
end

