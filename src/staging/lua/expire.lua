-- Give a dialog's keys the expiry an older release left off. dapi's first release kept a
-- granted dialog's keys without expiry; every later release expires them
-- DAPI_STAGING_TTL after the last write. Keys that should not expire stay as they are:
-- a refusal whose erasure is unconfirmed (`x`, or `z` as an older release marked it).
-- A meta that is not a hash (not dapi's) is left alone.
-- KEYS: 1 meta, 2 msgs
-- ARGV: 1 ttl (ms)
-- Returns 1 if it set an expiry, else 0.
if redis.call('PTTL', KEYS[1]) ~= -1 then return 0 end
local m = redis.pcall('HMGET', KEYS[1], 'x', 'z')
if type(m) ~= 'table' or m.err or m[1] or m[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[2]) == -1 then redis.call('PEXPIRE', KEYS[2], ARGV[1]) end
return 1
