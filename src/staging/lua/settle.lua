-- Settle a dialog that was staged while PostgreSQL could not be asked about it (marked
-- `u` by ingest.lua), with what PostgreSQL says now. Atomic.
-- If PostgreSQL holds the dialog as granted, its seq continues after PostgreSQL's last:
-- every staged message is renumbered, `n` moves on, and a dialog still pending is
-- granted again (that grant still stands). If PostgreSQL holds a refusal made within
-- the TTL (one Redis lost), a dialog still pending is refused again: its staged messages
-- are deleted and later ones refused (a grant Redis recorded since is newer and stands;
-- the flush drops what was received before the refusal). Otherwise the dialog simply
-- is what Redis says. Either way `u` goes.
-- KEYS: 1 meta, 2 msgs, 3 ids, left as they are (the messageIds keep the seq first
-- answered: a repeat answers what the first answer said, which for an unverified dialog
-- was provisional).
-- ARGV: 1 ttl (ms), 2 what PostgreSQL holds: GRANT 'grant', REFUSAL 'refusal' (one made
--       within the TTL), or NOTHING 'nothing'; with a grant or a refusal 3 its customer
--       id, and with a grant 4 its last seq
-- Returns SETTLED 'settled', NOTHING_TO_SETTLE 'nothing-to-settle' (settled already, or
-- forgotten), OTHER_CUSTOMER 'other-customer' (PostgreSQL holds the dialog under another
-- customer) or MALFORMED 'malformed' (a staged message is malformed); the last two leave
-- it unsettled, for the caller to set aside.
local SETTLED, NOTHING_TO_SETTLE, OTHER_CUSTOMER, MALFORMED = 'settled', 'nothing-to-settle', 'other-customer', 'malformed'
local GRANT, REFUSAL = 'grant', 'refusal'
local ttl, held, customer, last_seq = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local meta = redis.call('HMGET', KEYS[1], 'u', 'c', 'd')
if meta[1] ~= '1' then return NOTHING_TO_SETTLE end
if held == REFUSAL then
  if meta[2] ~= customer then return OTHER_CUSTOMER end
  if meta[3] == 'p' then
    redis.call('HSET', KEYS[1], 'd', 'r', 'r', 0)
    redis.call('DEL', KEYS[2])
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
elseif held == GRANT then
  if meta[2] ~= customer then return OTHER_CUSTOMER end
  local last = tonumber(last_seq)
  if last > 0 then
    local items = redis.call('LRANGE', KEYS[2], 0, -1)
    -- Check every item before rewriting any: a malformed one is set aside whole.
    for _, item in ipairs(items) do
      if not string.match(item, '^%d+:') then return MALFORMED end
    end
    if #items > 0 then
      local left = redis.call('PTTL', KEYS[2])
      redis.call('DEL', KEYS[2])
      for _, item in ipairs(items) do
        local seq, rest = string.match(item, '^(%d+)(:.*)$')
        redis.call('RPUSH', KEYS[2], string.format('%d', tonumber(seq) + last) .. rest)
      end
      if left > 0 then redis.call('PEXPIRE', KEYS[2], left) end
    end
    redis.call('HINCRBY', KEYS[1], 'n', last)
  end
  if meta[3] == 'p' then redis.call('HSET', KEYS[1], 'd', 'g') end
end
redis.call('HDEL', KEYS[1], 'u')
return SETTLED
