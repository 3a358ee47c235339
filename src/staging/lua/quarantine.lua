-- Set a dialog aside that the flusher cannot read (Guarantee 6): its keys move, unchanged
-- and without expiry, to the quarantine names beside them, and the reason is recorded in
-- the quarantine index. An operator inspects and replays them (README, "Quarantine").
-- KEYS: 1 meta, 2 msgs, 3 quarantined meta, 4 quarantined msgs, 5 quarantine index (hash)
-- ARGV: 1 dialog id, 2 reason
-- Returns 1 when it moved something.
local moved = 0
for i = 1, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[i + 2])
    redis.call('PERSIST', KEYS[i + 2])
    moved = 1
  end
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[5], ARGV[1], string.format('%d ', now[1]) .. ARGV[2])
return moved
