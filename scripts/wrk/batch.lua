-- wrk: POST /data with BATCH (default 100) messages a request, fresh dialog IDs per run
-- and per wrk thread. Used by scripts/bench-ingest; messages/s = requests/s × BATCH.
--
-- The same traffic as single.lua, batched: each wrk thread keeps 500 dialogs open and
-- takes their messages in turn, 5 messages a dialog, so 1 message in 5 starts a dialog
-- (here: 1 batch in 5 starts 100 dialogs, the others continue them).
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  n = 0
  size = tonumber(os.getenv("BATCH") or "100")
  base = (os.time() % 100000) * 1000000000 + tid * 100000000 + 50000000
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  local items = {}
  for k = 0, size - 1 do
    local m = n * size + k
    local d = m % 500 + 500 * math.floor(m / 2500)
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
