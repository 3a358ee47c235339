-- Set a dialog aside that the flusher cannot read (Guarantee 6): its messages — and, when
-- its state itself is unreadable, its meta — move, unchanged and without expiry, to the
-- quarantine names beside them, and the reason is recorded in the quarantine index. A
-- readable meta stays where it is, so the dialog's decision still holds for ingest and
-- consent (a refusal also erases the quarantined messages). Messages set aside earlier
-- are kept: new ones are appended. An operator inspects and replays them
-- (docs/operations.md, "Quarantine").
-- KEYS: 1 meta, 2 msgs, 3 quarantined meta, 4 quarantined msgs, 5 quarantine index (hash)
-- ARGV: 1 dialog id, 2 reason, 3 what to set aside: MESSAGES_ONLY 'messages-only' or
--       WHOLE_DIALOG 'whole-dialog'
-- Returns MOVED 'moved' when it moved something, else NOTHING_MOVED 'nothing-moved'.
local MESSAGES_ONLY, WHOLE_DIALOG = 'messages-only', 'whole-dialog'
local MOVED, NOTHING_MOVED = 'moved', 'nothing-moved'
local moved = NOTHING_MOVED
local items = redis.pcall('LRANGE', KEYS[2], 0, -1)
if items.err then
  -- Not a list at all (a hand edit): move it as it is.
  redis.call('RENAME', KEYS[2], KEYS[4])
  redis.call('PERSIST', KEYS[4])
  moved = MOVED
elseif #items > 0 then
  for i = 1, #items, 1000 do
    redis.call('RPUSH', KEYS[4], unpack(items, i, math.min(i + 999, #items)))
  end
  redis.call('DEL', KEYS[2])
  redis.call('PERSIST', KEYS[4])
  moved = MOVED
end
if ARGV[3] == WHOLE_DIALOG and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[3])
  redis.call('PERSIST', KEYS[3])
  moved = MOVED
elseif redis.call('EXISTS', KEYS[1]) == 1 then
  -- Nothing left to flush: let the dialog's queued flag go.
  redis.call('HSET', KEYS[1], 'q', 0)
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[5], ARGV[1], string.format('%d ', now[1]) .. ARGV[2])
return moved
