-- Finish a flush batch after its PostgreSQL commit (or a refusal after its erasure).
-- Atomic: for every dialog drop the staged messages up to the last seq written (messages
-- that arrived meanwhile stay); forget the unerased refusal that PostgreSQL has now
-- applied (if no newer refusal replaced it) and let the keys expire again; queue the
-- dialog again if it is granted and still has messages, else clear its queued flag;
-- then XACK and XDEL the batch's entries.
-- KEYS: 1 flush stream, then per dialog: meta, msgs
-- ARGV: 1 group, 2 dialog count n, 3 ttl (ms), then n quadruples (dialog id, last seq
--       written, how many messages the batch read, epoch of the refusal erased or 0),
--       then the entry ids
local n = tonumber(ARGV[2])
for i = 1, n do
  local meta, msgs = KEYS[2 * i], KEYS[2 * i + 1]
  local base = 4 * i
  local dialog, last, read, erased = ARGV[base], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), ARGV[base + 3]
  -- The list is in seq order and only grows at its tail, so the messages to drop are
  -- among the first `read`; a refusal meanwhile may have emptied it.
  local drop = 0
  if read > 0 and last > 0 then
    for _, item in ipairs(redis.call('LRANGE', msgs, 0, read - 1)) do
      if tonumber(string.match(item, '^(%d+):')) > last then break end
      drop = drop + 1
    end
    if drop > 0 then redis.call('LTRIM', msgs, drop, -1) end
  end
  local state = redis.call('HMGET', meta, 'd', 'x', 'z')
  if erased ~= '0' and (state[2] == erased or (not state[2] and state[3])) then
    redis.call('HDEL', meta, 'x', 'xt', 'z')
    redis.call('PEXPIRE', meta, ARGV[3])
    redis.call('PEXPIRE', msgs, ARGV[3])
  end
  if state[1] == 'g' and redis.call('LLEN', msgs) > 0 then
    redis.call('HSET', meta, 'q', 1)
    redis.call('XADD', KEYS[1], '*', 'd', dialog)
  elseif state[1] then
    redis.call('HSET', meta, 'q', 0)
  end
end
local ids = {}
for i = 4 + 4 * n, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
return #ids
