-- Finish a flush batch after its PostgreSQL commit. Atomic: for every dialog drop the
-- staged messages up to the last seq written (messages that arrived meanwhile stay),
-- queue the dialog again if it is granted and still has messages, else clear its
-- queued flag; then XACK and XDEL the batch's entries.
-- KEYS: 1 flush stream, then per dialog: meta, msgs
-- ARGV: 1 group, 2 dialog count n, then n triples (dialog id, last seq written, how many
--       messages the batch read), then the entry ids
local n = tonumber(ARGV[2])
for i = 1, n do
  local meta, msgs = KEYS[2 * i], KEYS[2 * i + 1]
  local dialog, last, read = ARGV[3 * i], tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  -- The list is in seq order and only grows at its tail, so the messages to drop are
  -- among the first `read`; a refusal meanwhile may have emptied it.
  local drop = 0
  if read > 0 then
    for _, item in ipairs(redis.call('LRANGE', msgs, 0, read - 1)) do
      if tonumber(string.match(item, '^(%d+):')) > last then break end
      drop = drop + 1
    end
    if drop > 0 then redis.call('LTRIM', msgs, drop, -1) end
  end
  local decision = redis.call('HGET', meta, 'd')
  if decision == 'g' and redis.call('LLEN', msgs) > 0 then
    redis.call('HSET', meta, 'q', 1)
    redis.call('XADD', KEYS[1], '*', 'd', dialog)
  elseif decision then
    redis.call('HSET', meta, 'q', 0)
  end
end
local ids = {}
for i = 3 + 3 * n, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
return #ids
