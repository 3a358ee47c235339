-- Claim a flush batch's dialogs before its PostgreSQL commit, inside its transaction
-- (the dialogs' rows locked by its upsert): make sure no seq the batch writes can be
-- handed out again by a life of the dialog Redis started after the snapshot (Redis
-- forgot the dialog — a restart, a failover, a DEL — and a message revived it from
-- PostgreSQL's last seq, which does not count this batch yet).
-- Per dialog, by its life stamp `b` (set when Redis created the meta):
--   * the same life: nothing to do (its `n` is past every seq the batch read);
--   * forgotten since the snapshot: its meta is written again as the snapshot read it
--     (granted, at the snapshot's epoch and life, `n` at the batch's highest seq), so a
--     message reviving it now continues after the batch;
--   * another life (revived or started since the snapshot): it may have handed out the
--     batch's seqs already, so the batch's messages get seqs of their own, reserved here
--     after that life's `n`.
-- KEYS: per dialog: meta
-- ARGV: 1 ttl (ms), then per dialog 5: the snapshot's life stamp (UNSTAMPED '': its meta
--       had none), customer id, epoch, highest seq the batch writes, how many messages
--       it writes
-- Returns per dialog KEEPS (false, a nil in the reply) when the batch keeps its seqs, or
-- the seq after which its messages are renumbered (reserved in this life's `n`).
local UNSTAMPED, KEEPS = '', false
local now = redis.call('TIME')
local now_us = string.format('%d', now[1] * 1000000 + now[2])
local out = {}
for i = 1, #KEYS do
  local a = 5 * i - 3
  local life, customer, epoch, last, count = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local m = redis.pcall('HMGET', KEYS[i], 'b', 'c')
  if m.err then
    -- Unreadable (a hand edit): the flusher sets it aside at its next snapshot.
    out[i] = KEEPS
  elseif not m[2] then
    if life ~= UNSTAMPED then
      redis.call('HSET', KEYS[i], 'c', customer, 'd', 'g', 'e', epoch, 'b', life, 'n', last, 'q', 0, 't', now_us, 'r', 0)
    else
      redis.call('HSET', KEYS[i], 'c', customer, 'd', 'g', 'e', epoch, 'n', last, 'q', 0, 't', now_us, 'r', 0)
    end
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    out[i] = KEEPS
  elseif (m[1] or UNSTAMPED) == life then
    out[i] = KEEPS
  else
    out[i] = redis.call('HINCRBY', KEYS[i], 'n', count) - tonumber(count)
  end
end
return out
