-- One step of a search through one partition's indexes (docs/contracts.md,
-- searching): one consistent snapshot of the stretch it reads.
-- KEYS[1] pending_by_second (its per-second id sets are KEYS[1]:<second>),
-- KEYS[2] pending_seconds, KEYS[3] settled_order
-- ARGV[1] promise key prefix of the partition ('<prefix>:{p<N>}:promise:'),
-- ARGV[2] phase to start in ('p' pending, 's' settled), ARGV[3] position
-- (the second, or the settlement ms), ARGV[4] last id returned at that
-- position or '', ARGV[5] phases to walk ('p', 's' or 'ps'), ARGV[6] page
-- room, ARGV[7] index entries to examine at most, ARGV[8] states
-- (',STATE,...,' or ''), ARGV[9] id glob ('*' wildcards, runs collapsed, at
-- most eight: IdPattern) or '', ARGV[10] job id
-- or '', ARGV[11] workspace or '', ARGV[12] tags as a JSON object or ''.
-- Returns {{id, record}..., the partition's version, next phase, position,
-- last id}: no next phase when the partition is done. The version (see
-- common.lua's bump_version) lets the caller check that the partition did
-- not change while it read others.
--
-- Pending promises are walked in order of their creation second, the ids of
-- a second in byte order; settled ones in order of settlement. Creation
-- seconds before the current one are closed (no promise can be created in
-- them any more), so a step may stop inside one; the current second is read
-- whole and ends the pending walk, so no step returns a promise created
-- after an earlier-created pending one it left out.
--
-- The per-second sets and the records are not in KEYS: their names come
-- from what the indexes hold. They share the partition's hash tag, so the
-- script still touches one slot.
local room = tonumber(ARGV[6])
local budget = tonumber(ARGV[7])
local states, pattern, job, ws = ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local tags = nil
if ARGV[12] ~= '' then tags = cjson.decode(ARGV[12]) end
local now_s = math.floor(now_ms() / 1000)
local out = {}
local version = redis.call('GET', version_key(ARGV[1])) or '0'
local function reply(...) return {out, version, ...} end

-- The record's other filters (the id pattern was checked before reading it).
local function matches(rec)
  if #rec == 0 then return false end
  local f = {}
  for i = 1, #rec, 2 do f[rec[i]] = rec[i + 1] end
  if states ~= '' and not string.find(states, ',' .. (f['state'] or '') .. ',', 1, true) then return false end
  if job ~= '' and f['job_id'] ~= job then return false end
  if ws ~= '' and (f['ws'] or 'default') ~= ws then return false end
  if tags then
    local ok, have = pcall(cjson.decode, f['tags'] or '{}')
    if not ok or type(have) ~= 'table' then return false end
    for k, v in pairs(tags) do
      if have[k] ~= v then return false end
    end
  end
  return true
end

-- The id glob's literal pieces between its stars. Matching is never a Lua
-- pattern: `.*` backtracks, exponentially in the stars, inside one C call
-- that nothing can interrupt. Here the first piece must start the id, the
-- last end it, and each middle piece is found (plain, leftmost) after the
-- one before: one substring search per piece, no retry. The loop runs once
-- per star, and IdPattern allows at most eight.
local pieces = {}
if pattern ~= '' then
  local from = 1
  while true do
    local star = string.find(pattern, '*', from, true)
    if not star then
      pieces[#pieces + 1] = string.sub(pattern, from)
      break
    end
    pieces[#pieces + 1] = string.sub(pattern, from, star - 1)
    from = star + 1
  end
end

local function glob_match(id)
  local n = #pieces
  if n == 1 then return id == pieces[1] end
  local first, final = pieces[1], pieces[n]
  -- The middle pieces must lie in id[lo..hi], between the first and the last.
  local lo, hi = #first + 1, #id - #final
  if hi + 1 < lo then return false end
  if string.sub(id, 1, #first) ~= first or string.sub(id, hi + 1) ~= final then return false end
  for i = 2, n - 1 do
    local s, e = string.find(id, pieces[i], lo, true)
    if not s or e > hi then return false end
    lo = e + 1
  end
  return true
end

-- Reads one id: the record is fetched only if the id glob allows it.
local function visit(id)
  budget = budget - 1
  if pattern ~= '' and not glob_match(id) then return end
  local rec = redis.call('HGETALL', ARGV[1] .. id)
  if matches(rec) then
    out[#out + 1] = {id, rec}
    room = room - 1
  end
end

local function full() return room <= 0 or budget <= 0 end
local function fmt(n) return string.format('%d', n) end

local phase, pos, last = ARGV[2], tonumber(ARGV[3]), ARGV[4]

if phase == 'p' then
  local seconds = redis.call('ZRANGEBYSCORE', KEYS[2], pos, '+inf', 'LIMIT', 0, budget)
  local reached_open = false
  for _, s in ipairs(seconds) do
    local second = tonumber(s)
    local ids = redis.call('HKEYS', KEYS[1] .. ':' .. s)
    table.sort(ids)
    local open = second >= now_s
    if open and #out > 0 and #ids > room then
      -- The open second does not fit on this page: the next step reads it whole.
      return reply('p', s, '')
    end
    for _, id in ipairs(ids) do
      if second > pos or last == '' or id > last then
        visit(id)
        if not open and full() then return reply('p', s, id) end
      end
    end
    if open then reached_open = true; break end
    if full() then return reply('p', fmt(second + 1), '') end
  end
  if not reached_open and #seconds == budget then
    -- More seconds may follow (a second counted before its ids were
    -- indexed holds none): the next step goes on from there.
    return reply('p', fmt(tonumber(seconds[#seconds]) + 1), '')
  end
  if not string.find(ARGV[5], 's', 1, true) then return reply() end
  pos, last = 0, ''
  if full() then return reply('s', '0', '') end
end

-- Settled: by settlement ms; the ids of one ms in byte order (a sorted set's
-- own order for equal scores), so (ms, id) is a position.
while true do
  if last ~= '' then
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], pos, pos)) do
      if id > last then
        visit(id)
        last = id
        if full() then return reply('s', fmt(pos), id) end
      end
    end
  end
  local batch = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. fmt(pos), '+inf', 'WITHSCORES', 'LIMIT', 0, 200)
  for i = 1, #batch, 2 do
    pos, last = tonumber(batch[i + 1]), batch[i]
    visit(last)
    if full() then return reply('s', fmt(pos), last) end
  end
  if #batch < 400 then return reply() end
end
