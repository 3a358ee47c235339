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
--       customer id, language, text, messageId (NO_MESSAGE_ID ''),
--       what to do when Redis does not know the dialog:
--          ASK_FIRST ''   stage nothing, answer UNKNOWN (the caller asks PostgreSQL first)
--          NEW 'n'        PostgreSQL holds no grant for it: a new pending dialog
--          a number       PostgreSQL holds it as granted with this last seq: granted
--                         again, its seq continuing
--          UNVERIFIED 'u' PostgreSQL could not be asked: pending, marked `u`, and queued
--                         so that the flusher settles it against PostgreSQL later
--       (Each argument costs Redis ~1.3k instructions: the dialog id, needed only to
--       queue a flush, is read from the meta key's name then.)
-- Returns one integer per item, seq * 32 + status * 4 + decision: status STAGED 0,
-- REPEAT 1 (the first answer's seq and decision), MISMATCH 2 (another customer's
-- dialog), REFUSED 3, UNKNOWN 4, SET_ASIDE 5 (keys of a wrong type moved aside; nothing
-- staged); the last four with seq and decision 0, returned as status * 4 (8, 12, 16,
-- 20); decision (DECISION) 0 'p', 1 'g', 2 'r'.
-- Integers, not strings: Redis turns a Lua number into a reply without formatting it
-- (a string per item cost ~2.3k of ~54k instructions per message), and a table of
-- tables was dearer still.
-- A staged message is `seq:receivedAt_µs:language:text`, or with a messageId
-- `seq:receivedAt_µs:language|messageId|:text` (neither a language nor a messageId can
-- hold `|`).
-- Each string → number conversion is a strtod (~700 instructions): done once, and the
-- messageIds' only when a message has one. Numbers go to redis.call as strings: Redis
-- formats a Lua number argument with snprintf('%.17g'), ~2k instructions each, and a
-- Lua concatenation of a number does the same ('%.14g'); string.format('%d') is cheaper,
-- and used once per message.
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
local keep_arg = string.format('%d', keep)
local stamp = ':' .. now_us .. ':'
local window, keep_ids, keep_ids_arg, refresh_ids, latest_ids
local DECISION = { p = 0, g = 1, r = 2 }

-- A key of the dialog that holds another type than dapi writes there (a hand edit, a
-- bug) must not fail the call (the other items of a batch) nor answer 500: the keys of
-- the wrong type are set aside as they are — the whole dialog when its meta is one of
-- them — under the quarantine names beside them, the reason goes into the shard's
-- quarantine index, and the item answers SET_ASIDE: the caller counts and logs it, and
-- stages the message as for a dialog Redis forgot. Only reached when a read failed.
local SET_ASIDE = 20
local function set_aside(meta, msgs, ids)
  local stem = string.sub(meta, 1, -6)
  local wanted = { meta = 'hash', msgs = 'list', ids = 'hash' }
  local keys = { meta = meta, msgs = msgs, ids = ids }
  local types = {}
  for name, key in pairs(keys) do types[name] = redis.call('TYPE', key).ok end
  local moved = {}
  for _, name in ipairs({ 'meta', 'msgs', 'ids' }) do
    local wrong = types[name] ~= 'none' and types[name] ~= wanted[name]
    local with_meta = name == 'msgs' and types.meta ~= 'none' and types.meta ~= 'hash' and types.msgs ~= 'none'
    if wrong or with_meta then
      local target = stem .. ':quarantined:' .. name
      if redis.call('EXISTS', target) == 1 then target = target .. ':' .. now_us end
      redis.call('RENAME', keys[name], target)
      redis.call('PERSIST', target)
      moved[#moved + 1] = name .. ' (a ' .. types[name] .. ')'
    end
  end
  local index = string.match(meta, '^(.*):d%d+:meta$') .. ':quarantine'
  redis.call('HSET', index, string.match(meta, ':d(%d+):meta$'),
    string.format('%d ', sec) .. 'ingest found keys of a type dapi does not write there: ' .. table.concat(moved, ', '))
  return SET_ASIDE
end

-- The customer index (`<shard>:customers:<bucket>`, the bucket being the customer id's
-- last three characters: sorted sets of `<customer>:<dialog>` members, all of score 0, so
-- that one customer's dialogs are one lexicographic range of one small set per shard):
-- what an erasure reads to find a customer's staged dialogs without a scan. Written only
-- where a dialog gets its customer — its creation, the adoption of a refusal recorded
-- for an unknown customer — so that it rides the rare branch, never a known dialog's
-- message; a bucket stays small (a listpack: one big set per shard cost batches ~15 %
-- in cache misses) and has no expiry to keep up. A member outlives its dialog until the
-- flusher's index sweep (index_sweep.lua) finds the dialog gone.
local function index(meta, stream, customer)
  -- Names by cutting, not by pattern (a pattern match cost ~8k instructions here):
  -- `stream` is `<shard>:flush`, `meta` is `<shard>:d<id>:meta`.
  local shard = string.sub(stream, 1, -6)
  redis.call('ZADD', shard .. 'customers:' .. string.sub(customer, -3), 0,
    customer .. ':' .. string.sub(meta, #shard + 2, -6))
end

local function stage(meta, msgs, ids, stream, customer, language, text, mid, mode)
  local m = redis.pcall('HMGET', meta, 'c', 'd', 'q', 'x', 'u', 'r')
  if m.err then return set_aside(meta, msgs, ids) end
  local created = false
  local decision, queued, unerased, unverified = m[2], m[3], m[4], m[5]
  local lives = m[6] or '0'
  if m[1] then
    -- '-1': refused while PostgreSQL could not name the customer; the refusal holds
    -- for anyone, and a later grant's messages belong to whoever posts first.
    if m[1] ~= customer and m[1] ~= '-1' then return 8 end
    if decision == 'r' then return 12 end
    if m[1] == '-1' then
      redis.call('HSET', meta, 'c', customer)
      index(meta, stream, customer)
    end
  elseif mode == '' then
    return 16
  elseif mid ~= '' and redis.pcall('HEXISTS', ids, mid) == 1 then
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
    local got = redis.pcall('HMGET', ids, mid, '~r')
    if got.err then return set_aside(meta, msgs, ids) end
    local first = got[1]
    ids_live = got[2] or '0'
    if not first and not decision then return 16 end
    if first then
      local seq, was = string.match(first, '^(%d+):(%a)$')
      return tonumber(seq) * 32 + 4 + DECISION[was]
    end
  end
  local seq
  if created then
    seq = decision == 'g' and tonumber(mode) + 1 or 1
  else
    seq = redis.call('HINCRBY', meta, 'n', '1')
  end
  local seq_arg = string.format('%d', seq)
  local staged
  if mid ~= '' then
    staged = seq_arg .. stamp .. language .. '|' .. mid .. '|:' .. text
  else
    staged = seq_arg .. stamp .. language .. ':' .. text
  end
  -- Appended before the messageId is recorded: a list of another type must leave no
  -- messageId pointing at a message that was never staged.
  local length = redis.pcall('RPUSH', msgs, staged)
  if type(length) == 'table' and length.err then return set_aside(meta, msgs, ids) end
  if mid ~= '' then
    local answer = seq_arg .. ':' .. decision
    if not window then
      window = tonumber(ARGV[2])
      keep_ids = window + math.floor(window / 100)
      keep_ids_arg = string.format('%d', keep_ids)
      refresh_ids, latest_ids = string.format('%d', now_ms + window), string.format('%d', now_ms + keep_ids)
    end
    if ids_live < refresh_ids or ids_live > latest_ids then
      redis.call('HSET', ids, mid, answer, '~r', latest_ids)
      redis.call('PEXPIRE', ids, keep_ids_arg)
    else
      redis.call('HSET', ids, mid, answer)
    end
  end
  local queue = (decision == 'g' or unverified == '1') and queued ~= '1'
  if created then
    -- The epoch starts at the clock, so that a dialog started again after Redis forgot
    -- it carries a newer epoch than anything PostgreSQL holds of it. `b`, the same
    -- instant, stamps this life of the dialog in Redis for good (claim.lua, finish.lua). Its
    -- keys' expiry is set here, its deadline `r` with the rest, and it is indexed under its
    -- customer.
    local q = queue and '1' or '0'
    if unverified then
      redis.call('HSET', meta, 'c', customer, 'd', decision, 'e', now_us, 'b', now_us, 'n', seq_arg, 'q', q, 't', now_us,
        'r', latest, 'u', '1')
    else
      redis.call('HSET', meta, 'c', customer, 'd', decision, 'e', now_us, 'b', now_us, 'n', seq_arg, 'q', q, 't', now_us,
        'r', latest)
    end
    redis.call('PEXPIRE', meta, keep_arg)
    redis.call('PEXPIRE', msgs, keep_arg)
    index(meta, stream, customer)
  elseif queue then
    redis.call('HSET', meta, 'q', '1')
  end
  if queue then
    redis.call('XADD', stream, '*', 'd', string.match(meta, ':d(%d+):meta$'))
  end
  local answer = seq * 32 + DECISION[decision]
  if created then
    return answer
  end
  -- Every dialog's keys expire DAPI_STAGING_TTL after its last write, except while a
  -- refusal's erasure is unconfirmed: that must outlive any PostgreSQL outage.
  if not unerased and (length == 1 or lives < refresh or lives > latest) then
    redis.call('PEXPIRE', meta, keep_arg)
    redis.call('PEXPIRE', msgs, keep_arg)
    redis.call('HSET', meta, 'r', latest)
  end
  return answer
end

local out = {}
for i = 1, #KEYS / 4 do
  local k, a = 4 * i - 3, 5 * i - 2
  out[i] = stage(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ARGV[a], ARGV[a + 1], ARGV[a + 2],
    ARGV[a + 3], ARGV[a + 4])
end
return out
