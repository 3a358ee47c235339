-- Delete consumers of the flush group that are gone: named by the caller after XINFO
-- showed them idle for long, and deleted here only if they still hold no pending entry
-- (checked and deleted in one atomic step, so no entry can be stranded).
-- KEYS: 1 flush stream
-- ARGV: 1 group, then consumer names
-- Returns how many were deleted.
local deleted = 0
for i = 2, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[i])
  if #pending == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[i])
    deleted = deleted + 1
  end
end
return deleted
