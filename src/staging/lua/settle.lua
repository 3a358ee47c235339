-- Settle a dialog that was staged while PostgreSQL could not be asked about it (marked
-- `u` by ingest.lua), with what PostgreSQL says now. Atomic.
-- If PostgreSQL holds the dialog as granted, its seq continues after PostgreSQL's last:
-- every staged message is renumbered, `n` moves on, and a dialog still pending is
-- granted again (that grant still stands). If PostgreSQL holds a refusal made within
-- the TTL (one Redis lost), a dialog still pending is refused again: its staged messages
-- are deleted and later ones refused (a grant Redis recorded since is newer and stands;
-- the flush drops what was received before the refusal). Otherwise the dialog simply
-- is what Redis says. Either way `u` goes.
-- KEYS: 1 meta, 2 msgs. (The messageIds keep the seq first answered: a repeat answers what
-- the first answer said, which for an unverified dialog was provisional.)
-- ARGV: 1 what PostgreSQL holds: 'g' a grant, 'r' a refusal within the TTL, '' nothing,
--       2 its customer id, 3 its last seq (a grant's), 4 ttl (ms)
-- Returns 1 settled, 0 nothing to settle (settled already, or forgotten), -1 PostgreSQL
-- holds the dialog under another customer, -2 a staged message is malformed (both left
-- unsettled, for the caller to set aside).
local meta = redis.call('HMGET', KEYS[1], 'u', 'c', 'd')
if meta[1] ~= '1' then return 0 end
if ARGV[1] == 'r' then
  if meta[2] ~= ARGV[2] then return -1 end
  if meta[3] == 'p' then
    redis.call('HSET', KEYS[1], 'd', 'r', 'r', 0)
    redis.call('DEL', KEYS[2])
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
  end
elseif ARGV[1] == 'g' then
  if meta[2] ~= ARGV[2] then return -1 end
  local last = tonumber(ARGV[3])
  if last > 0 then
    local items = redis.call('LRANGE', KEYS[2], 0, -1)
    -- Check every item before rewriting any: a malformed one is set aside whole.
    for _, item in ipairs(items) do
      if not string.match(item, '^%d+:') then return -2 end
    end
    if #items > 0 then
      local ttl = redis.call('PTTL', KEYS[2])
      redis.call('DEL', KEYS[2])
      for _, item in ipairs(items) do
        local seq, rest = string.match(item, '^(%d+)(:.*)$')
        redis.call('RPUSH', KEYS[2], string.format('%d', tonumber(seq) + last) .. rest)
      end
      if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
    end
    redis.call('HINCRBY', KEYS[1], 'n', last)

  end
  if meta[3] == 'p' then redis.call('HSET', KEYS[1], 'd', 'g') end
end
redis.call('HDEL', KEYS[1], 'u')
return 1
