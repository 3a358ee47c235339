-- The dialogs indexed under one customer in a slot group's shards (ingest.lua and
-- consent.lua write the index: dialog id -> the deadline, ms, its keys were last set to
-- expire by), those not past it. What an erasure reads to find a customer's staged
-- dialogs: one call per slot group, never a scan of the keyspace. The caller checks each
-- dialog's own customer when it refuses it (an index entry can outlive a dialog's life).
-- KEYS: the customer's index key in each shard of the group
-- Returns the dialog ids.
local now = redis.call('TIME')
local now_ms = string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000))
local out = {}
for _, key in ipairs(KEYS) do
  local found = redis.pcall('ZRANGEBYSCORE', key, now_ms, '+inf')
  if not found.err then
    for _, dialog in ipairs(found) do out[#out + 1] = dialog end
  end
end
return out
