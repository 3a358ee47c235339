-- The customer index's sweep: removes the members of one shard's index
-- (`<shard>:customers`, `<customer>:<dialog>`) whose dialog Redis no longer holds for that
-- customer — expired, erased, or a new life of the id under another customer — so that
-- the index holds no customer of a dialog gone (Guarantee 5). One bounded chunk a call,
-- in member order from a cursor; each member is checked and removed in this one atomic
-- step, so a dialog created again meanwhile keeps its member (ingest.lua adds it back only
-- on creation, and the ZADD runs either before this call or after it).
-- A meta of a wrong type (set aside by a script later) keeps its member: harmless, as an
-- erasure checks each dialog's own customer. A dialog refused for an unknown customer
-- (`c` = -1) keeps its member too: it may be that customer's.
-- KEYS: 1 the shard's index
-- ARGV: 1 the member to continue after ('' = from the start), 2 how many to check
-- Returns {the last member checked ('' = the index's end was reached), how many removed}.
local shard = string.sub(KEYS[1], 1, -10)
local from = ARGV[1] == '' and '-' or '(' .. ARGV[1]
local members = redis.call('ZRANGEBYLEX', KEYS[1], from, '+', 'LIMIT', 0, tonumber(ARGV[2]))
local removed = 0
for _, member in ipairs(members) do
  local customer, dialog = string.match(member, '^(-?%d+):(%d+)$')
  local keep = false
  if dialog then
    local owner = redis.pcall('HGET', shard .. 'd' .. dialog .. ':meta', 'c')
    keep = type(owner) == 'table' or owner == customer or owner == '-1'
  end
  if not keep then
    redis.call('ZREM', KEYS[1], member)
    removed = removed + 1
  end
end
local last = ''
if #members == tonumber(ARGV[2]) then last = members[#members] end
return { last, removed }
