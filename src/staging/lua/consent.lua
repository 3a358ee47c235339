-- Record a decision. Atomic: bump the epoch, set the decision; a grant keeps the dialog
-- (no TTL) and queues a flush; a refusal deletes the staged messages, starts the TTL and
-- queues a flush entry too, which erases the dialog from PostgreSQL should the caller's
-- own erasure not get there.
-- KEYS: 1 meta, 2 msgs, 3 flush stream
-- ARGV: 1 dialog id, 2 decision 'g' | 'r', 3 ttl (ms),
--       4 customer id to revive a dialog Redis forgot ('' = do not), 5 its last seq
-- A refusal also records `z`, the highest seq it erased: every message up to it must be
-- gone from PostgreSQL for good, whatever decision comes later.
-- Returns {'ok', epoch, customer id, decided-at (µs), z} or {'unknown', 0, 0, 0, 0}.
local now = redis.call('TIME')
local now_us = string.format('%d', now[1] * 1000000 + now[2])
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[4] == '' then return {'unknown', 0, 0, 0, 0} end
  redis.call('HSET', KEYS[1], 'c', ARGV[4], 'd', 'p', 'e', now_us, 'n', ARGV[5], 'q', 0)
end
local epoch = redis.call('HINCRBY', KEYS[1], 'e', 1)
redis.call('HSET', KEYS[1], 'd', ARGV[2], 't', now_us)
if ARGV[2] == 'g' then
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
  if redis.call('HGET', KEYS[1], 'q') ~= '1' then
    redis.call('HSET', KEYS[1], 'q', 1)
    redis.call('XADD', KEYS[3], '*', 'd', ARGV[1])
  end
else
  redis.call('HSET', KEYS[1], 'z', redis.call('HGET', KEYS[1], 'n'))
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('XADD', KEYS[3], '*', 'd', ARGV[1])
end
local meta = redis.call('HMGET', KEYS[1], 'c', 'z')
return {'ok', epoch, meta[1], now_us, meta[2] or 0}
