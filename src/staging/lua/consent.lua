-- Record a decision. Atomic: move the epoch on, set the decision.
-- A grant queues a flush. A refusal deletes the staged messages, remembers itself as
-- unerased (`x` = its epoch, `xt` = when) until PostgreSQL confirms the erasure (the
-- caller's own erasure or the flusher's, through finish.lua), and queues a flush entry,
-- which finishes the erasure should the caller's not get there. While `x` is set the
-- dialog's keys do not expire, however long PostgreSQL is away.
-- The dialog's messageIds stay, to expire with their window: while the dialog is refused
-- a repeat of one is refused like any message (ingest.lua checks the decision first), and
-- after a new grant it is a repeat still, answered as the first time, not staged again
-- (the erased text must not come back with a client's retry).
-- A meta of another type than dapi writes (a hand edit, a bug) never fails the call: a
-- refusal removes whatever Redis holds of the dialog, of any type, and records itself
-- (for a customer PostgreSQL names, else UNKNOWN_CUSTOMER); a grant sets the meta
-- (and the messages) aside under their quarantine names and goes on as if Redis had
-- forgotten the dialog.
-- The audit (GET /audit): a grant that changes the decision leaves `a` =
-- '<epoch>:<decided-at µs>' in meta, for whichever transaction first writes a decision at
-- least that new to PostgreSQL to write the grant's event (the grant's flush, or a
-- refusal that overtook it: a refusal hands `a` back to its caller). PostgreSQL's epoch
-- tells whether it was written already, so `a` simply stays until a later grant
-- replaces it. Redis re-learning a dialog sets none.
-- A dialog Redis forgot is created (revived) in the decision PostgreSQL holds, and indexed
-- under its customer (`<shard>:customers:<bucket>`, member `<customer>:<dialog>`, as
-- ingest.lua writes it): what an erasure reads to find a customer's staged dialogs
-- without a scan.
-- KEYS: 1 meta, 2 msgs, 3 flush stream, 4 the dialog's quarantined messages (a refusal
--       erases those too), 5 its quarantined meta, 6 its shard's quarantine index
-- ARGV: 1 dialog id, 2 the decision, GRANTED 'g' or REFUSED 'r', 3 ttl (ms),
--       4 the customer the dialog must belong to, or ANY_CUSTOMER '' (an erasure names
--       its own);
--       then, only to revive a dialog Redis forgot (absent: do not revive it),
--       5 its customer id (UNKNOWN_CUSTOMER '-1': a refusal of a dialog whose customer
--       PostgreSQL could not tell; ingest adopts the next poster's), 6 its last seq,
--       7 the decision PostgreSQL holds of it, 'g' or 'r', or NOTHING_HELD ''
-- Returns {status, aside, ...}: status RECORDED 'recorded', then epoch, customer id,
-- decided-at (µs), {seqs of the staged and quarantined messages a refusal deleted}, and
-- for a refusal the grant awaiting its audit event (meta's `a`; absent: none); or
-- UNKNOWN 'unknown' (Redis does not know the dialog and no revival was given) or
-- OTHER_CUSTOMER 'other-customer' (it belongs to another customer than ARGV[4]), both
-- with nothing recorded. aside SET_ASIDE 'set-aside' when the meta was of a wrong type
-- (removed or set aside), else AS_FOUND 'as-found'.
local RECORDED, UNKNOWN, OTHER_CUSTOMER = 'recorded', 'unknown', 'other-customer'
local SET_ASIDE, AS_FOUND = 'set-aside', 'as-found'
local ANY_CUSTOMER, UNKNOWN_CUSTOMER, NOTHING_HELD = '', '-1', ''
local dialog, decision, ttl, only_for = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local revive, last_seq, standing = ARGV[5], ARGV[6], ARGV[7]
local now = redis.call('TIME')
local now_us = string.format('%d', now[1] * 1000000 + now[2])
local aside = AS_FOUND
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'none' and kind ~= 'hash' then
  aside = SET_ASIDE
  if decision == 'r' then
    redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
    if not revive then revive, last_seq, standing = UNKNOWN_CUSTOMER, '0', NOTHING_HELD end
  else
    for _, pair in ipairs({ { KEYS[1], KEYS[5] }, { KEYS[2], KEYS[4] } }) do
      if redis.call('EXISTS', pair[1]) == 1 then
        local target = pair[2]
        if redis.call('EXISTS', target) == 1 then target = target .. ':' .. now_us end
        redis.call('RENAME', pair[1], target)
        redis.call('PERSIST', target)
      end
    end
    redis.call('HSET', KEYS[6], dialog, string.format('%d ', now[1]) ..
      'a decision found the meta of a type dapi does not write there (a ' .. kind .. ')')
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  if not revive then return {UNKNOWN, aside} end
  local held = standing ~= NOTHING_HELD and standing or 'p'
  redis.call('HSET', KEYS[1], 'c', revive, 'd', held, 'e', now_us, 'b', now_us, 'n', last_seq, 'q', 0)
  if revive ~= UNKNOWN_CUSTOMER then
    redis.call('ZADD', string.match(KEYS[1], '^(.*):d%d+:meta$') .. ':customers:' .. string.sub(revive, -3), 0,
      revive .. ':' .. dialog)
  end
end
-- A dialog refused for an unknown customer (UNKNOWN_CUSTOMER: PostgreSQL could not name it) may be the
-- erased customer's: refusing it again is harmless.
local owner = redis.call('HGET', KEYS[1], 'c')
if only_for ~= ANY_CUSTOMER and owner ~= only_for and owner ~= UNKNOWN_CUSTOMER then
  return {OTHER_CUSTOMER, aside}
end
local was = redis.call('HMGET', KEYS[1], 'd', 'a')
-- The epoch follows the clock, and is never less than one more than the last: a
-- decision made after a failover lost earlier ones (whose epochs PostgreSQL may hold)
-- still carries a newer epoch than any of them.
local epoch = math.max((tonumber(redis.call('HGET', KEYS[1], 'e')) or 0) + 1, now[1] * 1000000 + now[2])
local epoch_arg = string.format('%d', epoch)
-- `r` 0: the expiries set below are not ingest.lua's deadline; its next message
-- refreshes them.
redis.call('HSET', KEYS[1], 'e', epoch_arg, 'd', decision, 't', now_us, 'r', 0)
local unaudited, erased = nil, {}
if decision == 'g' then
  if was[1] ~= 'g' then redis.call('HSET', KEYS[1], 'a', epoch_arg .. ':' .. now_us) end
  if redis.call('HGET', KEYS[1], 'q') ~= '1' then
    redis.call('HSET', KEYS[1], 'q', 1)
    redis.call('XADD', KEYS[3], '*', 'd', dialog)
  end
  if redis.call('HEXISTS', KEYS[1], 'x') == 1 then
    redis.call('PERSIST', KEYS[1])
    redis.call('PERSIST', KEYS[2])
  else
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
else
  -- HMGET answers false for a missing field, which would reach the reply as a nil:
  -- nil leaves the reply one item shorter instead.
  unaudited = was[2] or nil
  for _, key in ipairs({ KEYS[2], KEYS[4] }) do
    local items = redis.pcall('LRANGE', key, 0, -1)
    if not items.err then
      for _, item in ipairs(items) do
        local seq = string.match(item, '^(%d+):')
        if seq then erased[#erased + 1] = seq end
      end
    end
  end
  -- The seqs a refusal deleted stay in meta (`xs`, comma-separated) while its erasure is
  -- unconfirmed, and a refusal again before the confirmation answers them too: an
  -- erasure that died between refusing in Redis and committing in PostgreSQL counts them
  -- when it runs again (its receipt stays exact), and so does a refusal retried while
  -- PostgreSQL was away.
  local pending = redis.call('HMGET', KEYS[1], 'x', 'xs')
  if pending[1] and pending[2] then
    for seq in string.gmatch(pending[2], '%d+') do erased[#erased + 1] = seq end
  end
  redis.call('HSET', KEYS[1], 'x', epoch_arg, 'xt', now_us, 'xs', table.concat(erased, ','))
  redis.call('DEL', KEYS[2], KEYS[4])
  redis.call('PERSIST', KEYS[1])
  redis.call('XADD', KEYS[3], '*', 'd', dialog)
end
return {RECORDED, aside, epoch, redis.call('HGET', KEYS[1], 'c'), now_us, erased, unaudited}
