-- Stage one message. Atomic: check owner and decision, take the next seq, append,
-- refresh the TTL, queue a flush when the dialog is already granted.
-- KEYS: 1 meta, 2 msgs, 3 flush stream
-- ARGV: 1 customer id, 2 dialog id, 3 language, 4 text, 5 ttl (ms)
-- Returns {decision, seq}; decision is 'p' or 'g', or 'mismatch' / 'refused' with seq 0.
local meta = redis.call('HMGET', KEYS[1], 'c', 'd', 'q')
local now = redis.call('TIME')
local now_us = string.format('%d', now[1] * 1000000 + now[2])
local decision = meta[2]
if meta[1] then
  if meta[1] ~= ARGV[1] then return {'mismatch', 0} end
  if decision == 'r' then return {'refused', 0} end
else
  -- A new dialog. The epoch starts at the clock so that a dialog forgotten after its
  -- TTL and started again always carries a newer epoch than anything stored before.
  decision = 'p'
  redis.call('HSET', KEYS[1], 'c', ARGV[1], 'd', 'p', 'e', now_us, 'n', 0, 'q', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('RPUSH', KEYS[2], string.format('%d:%s:%s:', seq, now_us, ARGV[3]) .. ARGV[4])
if decision == 'g' then
  if meta[3] ~= '1' then
    redis.call('HSET', KEYS[1], 'q', 1)
    redis.call('XADD', KEYS[3], '*', 'd', ARGV[2])
  end
else
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return {decision, seq}
