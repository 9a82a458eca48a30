-- Create a PENDING promise if absent (docs/contracts.md, handling a trigger step 2).
-- KEYS[1] promise hash, KEYS[2] partition deadlines zset,
-- KEYS[3] pending_by_second hash, KEYS[4] pending_seconds zset
-- ARGV[1] id, ARGV[2] timeout relative ms (used when ARGV[3] is 0),
-- ARGV[3] timeout absolute ms or 0, ARGV[4] retention ms,
-- ARGV[5] heartbeat seconds or '', ARGV[6..] field/value pairs ('' values skipped)
local reply = create_record(KEYS, ARGV, 6)
return reply
