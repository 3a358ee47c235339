-- Finish a flush batch after its PostgreSQL commit (or a refusal after its erasure).
-- Atomic: for every dialog drop the staged messages up to the last seq written (messages
-- that arrived meanwhile stay); forget the unerased refusal that PostgreSQL has now
-- applied (if no newer refusal replaced it) and let the keys expire again; queue the
-- dialog again if it is granted and still has messages, else clear its queued flag;
-- then XACK and XDEL the batch's entries.
-- A grant that PostgreSQL turned away because it holds a newer *refusal* means Redis lost
-- that refusal (a failover, a restore): Redis takes it back — refused at PostgreSQL's
-- epoch, its staged and quarantined messages deleted (PostgreSQL erased the dialog when
-- it took the refusal; a refusal erases both, and keeps the messageIds, consent.lua) —
-- unless Redis has moved past that epoch meanwhile.
-- KEYS: per dialog: meta, msgs, quarantined msgs, its shard's flush stream; then
--       the flush streams whose entries to acknowledge
-- ARGV: 1 group, 2 dialog count n, 3 ttl (ms), then n quintuples (dialog id, last seq
--       written, how many messages the batch read, epoch of the refusal erased or 0,
--       epoch of the refusal PostgreSQL holds that Redis must take back or 0), then per
--       stream after the dialogs' keys: how many of its entries, and their ids
local n = tonumber(ARGV[2])
for i = 1, n do
  local k = 4 * i - 3
  local meta, msgs, quarantined, stream = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local base = 5 * i - 1
  local dialog, last, read, erased = ARGV[base], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), ARGV[base + 3]
  local adopt = tonumber(ARGV[base + 4])
  if adopt > 0 then
    local m = redis.call('HMGET', meta, 'd', 'e')
    if m[1] and m[1] ~= 'r' and (tonumber(m[2]) or 0) < adopt then
      redis.call('HSET', meta, 'd', 'r', 'e', string.format('%d', adopt), 'r', 0)
      redis.call('DEL', msgs, quarantined)
      redis.call('PEXPIRE', meta, ARGV[3])
    end
  end
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
    redis.call('HDEL', meta, 'x', 'xt', 'z', 'r')
    redis.call('PEXPIRE', meta, ARGV[3])
    redis.call('PEXPIRE', msgs, ARGV[3])
  end
  if state[1] == 'g' and redis.call('LLEN', msgs) > 0 then
    redis.call('HSET', meta, 'q', 1)
    redis.call('XADD', stream, '*', 'd', dialog)
  elseif state[1] then
    redis.call('HSET', meta, 'q', 0)
  end
end
local acked, a = 0, 4 + 5 * n
for k = 4 * n + 1, #KEYS do
  local count = tonumber(ARGV[a])
  if count > 0 then
    local entries = {unpack(ARGV, a + 1, a + count)}
    redis.call('XACK', KEYS[k], ARGV[1], unpack(entries))
    redis.call('XDEL', KEYS[k], unpack(entries))
  end
  acked, a = acked + count, a + 1 + count
end
return acked
