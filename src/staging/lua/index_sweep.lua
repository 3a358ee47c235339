-- The customer index's sweep: removes the members of a shard's index buckets
-- (`<shard>:customers:<bucket>`, members `<customer>:<dialog>`) whose dialog Redis no
-- longer holds for that customer — expired, erased, or a new life of the id under another
-- customer — so that the index holds no customer of a dialog gone (Guarantee 5). One
-- bounded chunk a call: the buckets given, in order, from a cursor, at most BUDGET
-- members checked. Each member is checked and removed in this one atomic step, so a
-- dialog created again meanwhile keeps its member (ingest.lua adds it on creation, and
-- that ZADD runs either before this call or after it).
-- A meta of a wrong type (to be set aside by a script later) keeps its member: harmless,
-- as an erasure checks each dialog's own customer. A dialog refused for an unknown
-- customer (`c` = UNKNOWN_CUSTOMER) keeps its member too: it may be that customer's.
-- KEYS: buckets of one shard's index, in the sweep's order
-- ARGV: 1 the member of KEYS[1] to continue after (FROM_THE_START '': its first), 2 BUDGET
-- Returns {the index of the bucket it stopped in (#KEYS + 1: every bucket was done), the
-- member to continue after there, how many members it removed}.
local FROM_THE_START, UNKNOWN_CUSTOMER = '', '-1'
local budget = tonumber(ARGV[2])
local removed = 0
for i, key in ipairs(KEYS) do
  local shard = string.match(key, '^(.*:)customers:%d+$')
  local from = (i == 1 and ARGV[1] ~= FROM_THE_START) and '(' .. ARGV[1] or '-'
  local members = redis.call('ZRANGEBYLEX', key, from, '+', 'LIMIT', 0, budget)
  for _, member in ipairs(members) do
    local customer, dialog = string.match(member, '^(%d+):(%d+)$')
    local keep = false
    if dialog then
      local owner = redis.pcall('HGET', shard .. 'd' .. dialog .. ':meta', 'c')
      keep = type(owner) == 'table' or owner == customer or owner == UNKNOWN_CUSTOMER
    end
    if not keep then
      redis.call('ZREM', key, member)
      removed = removed + 1
    end
  end
  budget = budget - #members
  if budget <= 0 then
    return { i, members[#members], removed }
  end
end
return { #KEYS + 1, FROM_THE_START, removed }
