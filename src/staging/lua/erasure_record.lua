-- An erasure PostgreSQL could not record (it was away): kept in Redis until the loop that
-- finishes pending erasures moves it into PostgreSQL. One per customer: a repeated
-- DELETE finds it and answers the same receipt.
-- KEYS: 1 the records (hash: `c<customer>` -> `<erasure id> <requested-at µs>`, and
--       `e<erasure id>` -> `<customer> <requested-at µs>`)
-- ARGV: 1 customer, 2 a new erasure id, 3 now (µs)
-- Returns the customer's record: `<erasure id> <requested-at µs>`.
local have = redis.call('HGET', KEYS[1], 'c' .. ARGV[1])
if have then return have end
redis.call('HSET', KEYS[1], 'c' .. ARGV[1], ARGV[2] .. ' ' .. ARGV[3], 'e' .. ARGV[2], ARGV[1] .. ' ' .. ARGV[3])
return ARGV[2] .. ' ' .. ARGV[3]
