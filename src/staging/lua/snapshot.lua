-- Read the state of a batch's dialogs in one atomic step, within a byte budget.
-- KEYS: per dialog: meta, msgs
-- ARGV: 1 most messages per dialog, 2 byte budget for all messages together
-- Returns per dialog {UNREADABLE} when its meta is not a hash (a hand edit), else meta's
-- fields as they are, {customer `c`, decision `d`, epoch `e`, decided-at `t`, unerased
-- refusal's epoch `x`, its decided-at `xt`, unverified `u`, messages, life stamp `b`,
-- grant awaiting its audit event `a`, the seqs that refusal deleted `xs`} (nil where absent: every field of a forgotten
-- dialog), messages a list, or UNREADABLE when msgs is not one. The caller checks every
-- field (a dialog it cannot read is set aside, not failed on).
-- Only a granted, settled dialog's messages are read. The budget stops reading once
-- reached (the first message always fits), so a batch of large texts stays bounded; the
-- flusher re-queues what it did not read.
local UNREADABLE = 'unreadable'
local max, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
local used = 0
local out = {}
for i = 1, #KEYS / 2 do
  -- pcall: a key of the wrong type (a hand edit) must spoil only its own dialog, which
  -- the caller then sets aside, not the whole batch.
  local meta = redis.pcall('HMGET', KEYS[2 * i - 1], 'c', 'd', 'e', 't', 'x', 'xt', 'u', 'b', 'a', 'xs')
  if meta.err then
    out[i] = {UNREADABLE}
  else
    local msgs = {}
    if meta[2] == 'g' and meta[7] ~= '1' then
      local start = 0
      while #msgs < max and used < budget do
        local chunk = redis.pcall('LRANGE', KEYS[2 * i], start, start + 63)
        if chunk.err then msgs = UNREADABLE break end
        for _, item in ipairs(chunk) do
          if #msgs >= max or used >= budget then break end
          msgs[#msgs + 1] = item
          used = used + #item
        end
        if #chunk < 64 then break end
        start = start + 64
      end
    end
    out[i] = {meta[1], meta[2], meta[3], meta[4], meta[5], meta[6], meta[7], msgs, meta[8], meta[9], meta[10]}
  end
end
return out
