-- Stage one message. Atomic: check owner and decision, take the next seq, append,
-- refresh the TTL, queue a flush when the dialog is granted (or must be settled).
-- KEYS: 1 meta, 2 msgs, 3 flush stream
-- ARGV: 1 customer id, 2 dialog id, 3 language, 4 text, 5 ttl (ms),
--       6 what to do when Redis does not know the dialog:
--          ''        stage nothing, answer 'unknown' (the caller asks PostgreSQL first)
--          'new'     PostgreSQL holds no grant for it: a new pending dialog
--          'revive'  PostgreSQL holds it as granted with last seq ARGV[7]: granted again,
--                    its seq continuing
--          'unverified'  PostgreSQL could not be asked: pending, marked `u`, and queued
--                    so that the flusher settles it against PostgreSQL later
--       7 last seq stored in PostgreSQL (for 'revive')
-- Returns {decision, seq}; decision is 'p' or 'g', or 'mismatch' / 'refused' / 'unknown'
-- with seq 0.
local meta = redis.call('HMGET', KEYS[1], 'c', 'd', 'q', 'x', 'u')
local now = redis.call('TIME')
local now_us = string.format('%d', now[1] * 1000000 + now[2])
local decision, queued, unerased, unverified = meta[2], meta[3], meta[4], meta[5]
if meta[1] then
  if meta[1] ~= ARGV[1] then return {'mismatch', 0} end
  if decision == 'r' then return {'refused', 0} end
elseif ARGV[6] == '' then
  return {'unknown', 0}
else
  -- The epoch starts at the clock, so that a dialog started again after Redis forgot it
  -- carries a newer epoch than anything PostgreSQL holds of it.
  decision = ARGV[6] == 'revive' and 'g' or 'p'
  local last = ARGV[6] == 'revive' and ARGV[7] or '0'
  redis.call('HSET', KEYS[1], 'c', ARGV[1], 'd', decision, 'e', now_us, 'n', last, 'q', 0, 't', now_us)
  queued = '0'
  if ARGV[6] == 'unverified' then
    redis.call('HSET', KEYS[1], 'u', 1)
    unverified = '1'
  end
end
local seq = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('RPUSH', KEYS[2], string.format('%d:%s:%s:', seq, now_us, ARGV[3]) .. ARGV[4])
if (decision == 'g' or unverified == '1') and queued ~= '1' then
  redis.call('HSET', KEYS[1], 'q', 1)
  redis.call('XADD', KEYS[3], '*', 'd', ARGV[2])
end
-- Every dialog's keys expire DAPI_STAGING_TTL after its last write, except while a
-- refusal's erasure is unconfirmed: that must outlive any PostgreSQL outage.
if not unerased then
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return {decision, seq}
