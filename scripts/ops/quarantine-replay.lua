-- Puts a dialog that dapi set aside back where dapi reads it, once an operator has
-- repaired what its reason names (docs/operations.md, "Quarantine"). Works whatever was
-- set aside — the state and the messages, the messages alone, or the state alone — and
-- whether or not the dialog received messages meanwhile (they stay, merged in seq
-- order). Run with redis-cli --eval; on a Redis Cluster add -c (every key shares the
-- dialog's hash tag).
-- KEYS: 1 meta, 2 msgs, 3 quarantined meta, 4 quarantined msgs, 5 the shard's flush
--       stream, 6 the shard's quarantine index
-- ARGV: 1 dialog id, 2 DAPI_STAGING_TTL in ms (the keys expire that long after)
-- Returns how many messages it put back.
if redis.call('EXISTS', KEYS[3]) == 1 then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return redis.error_reply('the dialog lives again under its own meta: compare it with the quarantined one, delete one, run again')
  end
  redis.call('RENAME', KEYS[3], KEYS[1])
end
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then
  return redis.error_reply('no readable state to put the messages back under: repair or recreate the meta first')
end
local back = redis.call('LRANGE', KEYS[4], 0, -1)
if #back > 0 then
  local all = redis.call('LRANGE', KEYS[2], 0, -1)
  for _, item in ipairs(back) do all[#all + 1] = item end
  local function seq(item) return tonumber(string.match(item, '^(%d+):')) or 0 end
  table.sort(all, function(a, b) return seq(a) < seq(b) end)
  redis.call('DEL', KEYS[2], KEYS[4])
  for _, item in ipairs(all) do redis.call('RPUSH', KEYS[2], item) end
end
-- Expire as dapi would have (`r` 0: the next message refreshes the deadline), and queue
-- the dialog so that the flusher reads it again.
redis.call('HSET', KEYS[1], 'q', 1, 'r', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
redis.call('XADD', KEYS[5], '*', 'd', ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
return #back
