-- Stage messages: one item for POST /data/{c}/{d}, up to a batch for POST /data. Each
-- item is one atomic step of the same kind (the script runs alone): check owner and
-- decision, answer a repeated messageId with the first answer, take the next seq,
-- append, refresh the TTL, queue a flush when the dialog is granted (or must be
-- settled). Items of one dialog get consecutive seqs in the order given.
-- Expiry, with slack: a dialog's keys expire DAPI_STAGING_TTL after its last message (its
-- messageIds DAPI_IDEMPOTENCY_WINDOW after the last one), at most 1 % later. A message
-- refreshes the expiry to TTL + 1 % only when less than TTL is left, recorded as the
-- deadline set (ms since the epoch, 13 digits until the year 2286): meta's `r`, and the
-- messageIds hash's own field `~r` (no messageId can hold `~`), so that a hash deleted
-- or evicted takes its deadline with it. Most messages skip the two or three PEXPIREs:
-- they were ~2 µs of Redis's ~8 µs per staged message. The deadlines are compared as
-- strings: `tonumber` of a 13-digit string costs more than the PEXPIREs it saves. A
-- script that sets meta's or msgs' expiry otherwise zeroes `r` (consent.lua,
-- finish.lua); a list that RPUSH creates anew (emptied by a flush) is refreshed at once.
-- A new dialog's meta is written once, after its first message is appended: its first
-- seq, flush flag and deadline in the one HSET (no HINCRBY, no second HSET: ~two of a
-- first message's ten commands).
-- KEYS: per item: meta, msgs, ids (messageId → "seq:decision"), its shard's flush stream
-- ARGV: 1 ttl (ms), 2 idempotency window (ms), then per item 5 values:
--       customer id, language, text, messageId ('' = none),
--       what to do when Redis does not know the dialog:
--          ''        stage nothing, answer 'unknown' (the caller asks PostgreSQL first)
--          'n'       PostgreSQL holds no grant for it: a new pending dialog
--          a number  PostgreSQL holds it as granted with this last seq: granted again,
--                    its seq continuing
--          'u'       PostgreSQL could not be asked: pending, marked `u`, and queued
--                    so that the flusher settles it against PostgreSQL later
--       (Each argument costs Redis ~1.3k instructions: the dialog id, needed only to
--       queue a flush, is read from the meta key's name then.)
-- Returns one string, per item `status seq decision` joined by ',': status 'ok' (staged),
-- 'dup' (a repeat: the first answer's seq and decision), 'mismatch', 'refused' or
-- 'unknown' (seq 0, decision '-'). One string, not a table of tables: converting nested
-- tables to a reply was a measurable part of a call.
-- A staged message is `seq:receivedAt_µs:language:text`, or with a messageId
-- `seq:receivedAt_µs:language|messageId|:text` (neither a language nor a messageId can
-- hold `|`).
-- Each string → number conversion is a strtod (~700 instructions): done once, and the
-- messageIds' only when a message has one.
local ttl = tonumber(ARGV[1])
local now = redis.call('TIME')
local sec, usec = tonumber(now[1]), tonumber(now[2])
local now_us = string.format('%d', sec * 1000000 + usec)
local now_ms = sec * 1000 + math.floor(usec / 1000)
-- A deadline (fixed width) before `refresh` needs a refresh; '0' or none always does;
-- so does one after `latest`, set under a longer TTL than this process's (a lowered
-- DAPI_STAGING_TTL takes effect at a dialog's next message).
local keep = ttl + math.floor(ttl / 100)
local refresh, latest = string.format('%d', now_ms + ttl), string.format('%d', now_ms + keep)
local window, keep_ids, refresh_ids, latest_ids

local function stage(meta, msgs, ids, stream, customer, language, text, mid, mode)
  local m = redis.call('HMGET', meta, 'c', 'd', 'q', 'x', 'u', 'r')
  local created = false
  local decision, queued, unerased, unverified = m[2], m[3], m[4], m[5]
  local lives = m[6] or '0'
  if m[1] then
    -- '-1': refused while PostgreSQL could not name the customer; the refusal holds
    -- for anyone, and a later grant's messages belong to whoever posts first.
    if m[1] ~= customer and m[1] ~= '-1' then return 'mismatch 0 -' end
    if decision == 'r' then return 'refused 0 -' end
    if m[1] == '-1' then redis.call('HSET', meta, 'c', customer) end
  elseif mode == '' then
    return 'unknown 0 -'
  elseif mid ~= '' and redis.call('HEXISTS', ids, mid) == 1 then
    -- A repeat of a message of a life of the dialog Redis forgot: answered below,
    -- without creating a dialog that nothing would expire.
    decision = nil
  else
    -- Created below, in one HSET with its first seq (no HINCRBY, no second HSET).
    created = true
    decision = (mode ~= 'n' and mode ~= 'u') and 'g' or 'p'
    queued = '0'
    if mode == 'u' then unverified = '1' end
  end
  local ids_live
  if mid ~= '' then
    local got = redis.call('HMGET', ids, mid, '~r')
    local first = got[1]
    ids_live = got[2] or '0'
    if not first and not decision then return 'unknown 0 -' end
    if first then
      local seq, was = string.match(first, '^(%d+):(%a)$')
      return 'dup ' .. seq .. ' ' .. was
    end
  end
  local seq
  if created then
    seq = decision == 'g' and tonumber(mode) + 1 or 1
  else
    seq = redis.call('HINCRBY', meta, 'n', 1)
  end
  local head = string.format('%d:%s:%s', seq, now_us, language)
  if mid ~= '' then
    head = head .. '|' .. mid .. '|'
    local answer = string.format('%d:%s', seq, decision)
    if not window then
      window = tonumber(ARGV[2])
      keep_ids = window + math.floor(window / 100)
      refresh_ids, latest_ids = string.format('%d', now_ms + window), string.format('%d', now_ms + keep_ids)
    end
    if ids_live < refresh_ids or ids_live > latest_ids then
      redis.call('HSET', ids, mid, answer, '~r', latest_ids)
      redis.call('PEXPIRE', ids, keep_ids)
    else
      redis.call('HSET', ids, mid, answer)
    end
  end
  local length = redis.call('RPUSH', msgs, head .. ':' .. text)
  local queue = (decision == 'g' or unverified == '1') and queued ~= '1'
  if created then
    -- The epoch starts at the clock, so that a dialog started again after Redis forgot
    -- it carries a newer epoch than anything PostgreSQL holds of it. Its keys' expiry
    -- is set here, its deadline `r` with the rest.
    local n, q = string.format('%d', seq), queue and 1 or 0
    if unverified then
      redis.call('HSET', meta, 'c', customer, 'd', decision, 'e', now_us, 'n', n, 'q', q, 't', now_us,
        'r', latest, 'u', 1)
    else
      redis.call('HSET', meta, 'c', customer, 'd', decision, 'e', now_us, 'n', n, 'q', q, 't', now_us,
        'r', latest)
    end
    redis.call('PEXPIRE', meta, keep)
    redis.call('PEXPIRE', msgs, keep)
  elseif queue then
    redis.call('HSET', meta, 'q', 1)
  end
  if queue then
    redis.call('XADD', stream, '*', 'd', string.match(meta, ':d(%d+):meta$'))
  end
  if created then
    return string.format('ok %d %s', seq, decision)
  end
  -- Every dialog's keys expire DAPI_STAGING_TTL after its last write, except while a
  -- refusal's erasure is unconfirmed: that must outlive any PostgreSQL outage.
  if not unerased and (length == 1 or lives < refresh or lives > latest) then
    redis.call('PEXPIRE', meta, keep)
    redis.call('PEXPIRE', msgs, keep)
    redis.call('HSET', meta, 'r', latest)
  end
  return string.format('ok %d %s', seq, decision)
end

local out = {}
for i = 1, #KEYS / 4 do
  local k, a = 4 * i - 3, 5 * i - 2
  out[i] = stage(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ARGV[a], ARGV[a + 1], ARGV[a + 2],
    ARGV[a + 3], ARGV[a + 4])
end
return table.concat(out, ',')
