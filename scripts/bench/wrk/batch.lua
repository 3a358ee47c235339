-- wrk: POST /data with BATCH (default 100) messages a request, fresh dialog IDs per run
-- and per wrk thread. Used by scripts/bench/bench-ingest; messages/s = requests/s × BATCH.
--
-- The same traffic as single.lua, batched: a dialog's messages come one after another,
-- its next one only after the batch with its previous one was answered. Each wrk thread
-- keeps 64 batches' worth of dialogs open (6,400 at 100 a batch) and takes their
-- messages in turn, so a dialog's next message follows its previous one by 64 batches
-- (a thread has at most 32 in flight), 5 messages a dialog: 1 batch in 5 starts 100
-- dialogs, the others continue them. (Before 347532f only 500 dialogs were open: a
-- dialog's second message was often sent while the batch creating it was in flight, and
-- ~70 % of batches paid the new-dialog path, not 20 %.)
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  n = 0
  size = tonumber(os.getenv("BATCH") or "100")
  open = 64 * size
  base = (os.time() % 100000) * 1000000000 + tid * 100000000 + 50000000
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  local items = {}
  for k = 0, size - 1 do
    local m = n * size + k
    local d = m % open + open * math.floor(m / (open * 5))
    items[#items + 1] = string.format(
      '{"customerId": %d, "dialogId": %d, "text": "Hello, World", "language": "EN"}',
      d % 100, base + d)
  end
  n = n + 1
  return wrk.format("POST", "/data", headers, '{"messages": [' .. table.concat(items, ",") .. ']}')
end

function done(summary, latency, requests)
  io.write(string.format("non-2xx: %d\n", summary.errors.status))
end
