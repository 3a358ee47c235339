-- Where a dialog stands in Redis (GET /consents/{dialogId}): its customer, decision and
-- decision time, and the seqs of its staged messages. Keys of a wrong type read as
-- nothing (the dialog is then as Redis had forgotten it).
-- KEYS: 1 meta, 2 msgs
-- Returns {customer, decision, decided-at (µs), {seqs}}, nils when Redis does not know it.
local m = redis.pcall('HMGET', KEYS[1], 'c', 'd', 't')
if m.err or not m[1] then return {} end
local seqs = {}
local items = redis.pcall('LRANGE', KEYS[2], 0, -1)
if not items.err then
  for _, item in ipairs(items) do
    local seq = string.match(item, '^(%d+):')
    if seq then seqs[#seqs + 1] = seq end
  end
end
return {m[1], m[2], m[3], seqs}
