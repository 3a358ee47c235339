-- Take or renew the lease on a flusher consumer slot, compare-and-set: only if the slot
-- is free, or still held by the holder the caller saw (and judged gone), or by the caller.
-- KEYS: 1 slot key
-- ARGV: 1 caller ("pid:instance:task"), 2 lease (ms), 3 the holder the caller saw ('' = none)
-- Returns 1 when the caller holds the slot now, else 0.
local holder = redis.call('GET', KEYS[1])
if (not holder and ARGV[3] == '') or holder == ARGV[3] or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
