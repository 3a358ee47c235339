-- The dialogs indexed under one customer in a slot group's shards: what an erasure reads
-- to find a customer's staged dialogs, one call per slot group, never a scan of the
-- keyspace. The customer's bucket of each shard's index (`<shard>:customers:<bucket>`,
-- written by ingest.lua and consent.lua) holds `<customer>:<dialog>` members of score 0,
-- so one customer's dialogs are the lexicographic range from `<customer>:` to
-- `<customer>;` (`;` follows `:`): a cost of the customer's own dialogs (and a small
-- bucket's), whatever the index's size. A member can outlive its
-- dialog (until the index sweep) and a dialog can belong to another customer by now: the
-- caller checks each dialog's own customer when it refuses it.
-- Indexes of the earlier layout (`<shard>:c<customer>`: dialog id → deadline, ms, with
-- their own expiry) are read too, those members not past their deadline, until they
-- have expired by themselves (DAPI_STAGING_TTL after an upgrade).
-- KEYS: per shard of the group, the customer's bucket of its index and its earlier
--       per-customer index
-- ARGV: 1 the customer id
-- Returns the dialog ids.
local now = redis.call('TIME')
local now_ms = string.format('%d', now[1] * 1000 + math.floor(now[2] / 1000))
local low, high = '[' .. ARGV[1] .. ':', '(' .. ARGV[1] .. ';'
local skip = #ARGV[1] + 2
local out = {}
for i = 1, #KEYS, 2 do
  local found = redis.pcall('ZRANGEBYLEX', KEYS[i], low, high)
  if not found.err then
    for _, member in ipairs(found) do out[#out + 1] = string.sub(member, skip) end
  end
  local earlier = redis.pcall('ZRANGEBYSCORE', KEYS[i + 1], now_ms, '+inf')
  if not earlier.err then
    for _, dialog in ipairs(earlier) do out[#out + 1] = dialog end
  end
end
return out
