-- Finish a flush batch after its PostgreSQL commit (or a refusal after its erasure).
-- Atomic: for every dialog drop the staged messages up to the last seq written (messages
-- that arrived meanwhile stay) — only in the life of the dialog the snapshot read (its
-- stamp `b`): a life Redis started since (a restart mid-batch, a revival) holds none of
-- the batch's messages; forget the unerased refusal that PostgreSQL has now
-- applied (if no newer refusal replaced it) and let the keys expire again; queue the
-- dialog again if it is granted and still has messages, else clear its queued flag;
-- then XACK and XDEL the batch's entries.
-- A grant that PostgreSQL turned away because it holds a newer decision means Redis lost
-- that decision (a failover, a restore): Redis takes it back unless it has moved past
-- that epoch meanwhile. A newer *refusal*: refused at PostgreSQL's epoch, its staged and
-- quarantined messages deleted (PostgreSQL erased the dialog when it took the refusal; a
-- refusal erases both, and keeps the messageIds, consent.lua). A newer *grant*: Redis's
-- epoch moves on to it, so that the next flush is not fenced, and what Redis staged
-- before the dialog was last erased in PostgreSQL goes (a failover brought it back
-- after a refusal erased it); what came after stays, to be flushed.
-- KEYS: per dialog: meta, msgs, quarantined msgs, its shard's flush stream; then
--       the flush streams whose entries to acknowledge
-- ARGV: 1 group, 2 dialog count n, 3 ttl (ms), then 8 values per dialog:
--         the snapshot's life stamp (UNSTAMPED '': its meta had none),
--         dialog id,
--         the last seq written (NOTHING_WRITTEN ''),
--         how many messages the snapshot read,
--         the epoch of the refusal PostgreSQL has now erased (NO_REFUSAL ''),
--         the decision to take back: TAKE_BACK_REFUSAL 'refusal', TAKE_BACK_GRANT
--         'grant', or NOTHING_TO_TAKE_BACK '',
--         its epoch ('' with nothing to take back),
--         for a grant when PostgreSQL last erased the dialog (µs, 0: never; '' with
--         nothing to take back);
--       then per stream after the dialogs' keys: how many of its entries, and their ids
-- Meta's `r` (ingest's expiry deadline) is zeroed or removed wherever this script sets
-- an expiry itself; `d` 'r' is the refused decision, a value.
-- Returns how many entries it acknowledged.
local UNSTAMPED, NOTHING_WRITTEN, NO_REFUSAL = '', '', ''
local TAKE_BACK_REFUSAL, TAKE_BACK_GRANT, NOTHING_TO_TAKE_BACK = 'refusal', 'grant', ''
local n = tonumber(ARGV[2])
for i = 1, n do
  local k = 4 * i - 3
  local meta, msgs, quarantined, stream = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local base = 8 * i - 4
  local life, dialog, last, read = ARGV[base], ARGV[base + 1], ARGV[base + 2], tonumber(ARGV[base + 3])
  local erased, take_back = ARGV[base + 4], ARGV[base + 5]
  if take_back ~= NOTHING_TO_TAKE_BACK then
    local newer, since = tonumber(ARGV[base + 6]), tonumber(ARGV[base + 7])
    local m = redis.call('HMGET', meta, 'd', 'e')
    local older = m[1] and (tonumber(m[2]) or 0) < newer
    if take_back == TAKE_BACK_REFUSAL and older and m[1] ~= 'r' then
      redis.call('HSET', meta, 'd', 'r', 'e', string.format('%d', newer), 'r', 0)
      redis.call('DEL', msgs, quarantined)
      redis.call('PEXPIRE', meta, ARGV[3])
    elseif take_back == TAKE_BACK_GRANT and older and m[1] == 'g' then
      redis.call('HSET', meta, 'e', string.format('%d', newer))
      local items = redis.call('LRANGE', msgs, 0, -1)
      local kept = {}
      for _, item in ipairs(items) do
        local at = tonumber(string.match(item, '^%d+:(%d+):'))
        if not at or at > since then kept[#kept + 1] = item end
      end
      if #kept < #items then
        local ttl = redis.call('PTTL', msgs)
        redis.call('DEL', msgs)
        for _, item in ipairs(kept) do redis.call('RPUSH', msgs, item) end
        if ttl > 0 and #kept > 0 then redis.call('PEXPIRE', msgs, ttl) end
      end
      read = 0
    end
  end
  -- The list is in seq order and only grows at its tail, so the messages to drop are
  -- among the first `read`; a refusal meanwhile may have emptied it.
  local drop = 0
  if last ~= NOTHING_WRITTEN and read > 0 and (redis.call('HGET', meta, 'b') or UNSTAMPED) == life then
    last = tonumber(last)
    for _, item in ipairs(redis.call('LRANGE', msgs, 0, read - 1)) do
      if tonumber(string.match(item, '^(%d+):')) > last then break end
      drop = drop + 1
    end
    if drop > 0 then redis.call('LTRIM', msgs, drop, -1) end
  end
  local state = redis.call('HMGET', meta, 'd', 'x')
  if erased ~= NO_REFUSAL and state[2] == erased then
    redis.call('HDEL', meta, 'x', 'xt', 'xs', 'r')
    redis.call('PEXPIRE', meta, ARGV[3])
    redis.call('PEXPIRE', msgs, ARGV[3])
  end
  if state[1] == 'g' and redis.call('LLEN', msgs) > 0 then
    redis.call('HSET', meta, 'q', 1)
    redis.call('XADD', stream, '*', 'd', dialog)
  elseif state[1] then
    redis.call('HSET', meta, 'q', 0)
  end
end
local acked, a = 0, 4 + 8 * n
for k = 4 * n + 1, #KEYS do
  local count = tonumber(ARGV[a])
  if count > 0 then
    local entries = {unpack(ARGV, a + 1, a + count)}
    redis.call('XACK', KEYS[k], ARGV[1], unpack(entries))
    redis.call('XDEL', KEYS[k], unpack(entries))
  end
  acked, a = acked + count, a + 1 + count
end
return acked
