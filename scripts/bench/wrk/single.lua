-- wrk: POST /data/{customerId}/{dialogId}, dialogs of 5 messages over 100 customers,
-- fresh dialog IDs per run and per wrk thread. Used by scripts/bench/bench-ingest.
--
-- As bots post: a dialog's messages come one after another, not at once. Each wrk
-- thread keeps 256 dialogs open and sends to them in turn, so a dialog's next message
-- follows its previous one by 256 requests (its first, which makes it known to Redis,
-- has been answered by then); each dialog gets 5 messages, 1 in 5 requests starts one.
-- `wrk ... -s single.lua URL -- N` gives each dialog N messages instead (N = 1000: the
-- known-dialogs traffic of BENCHMARKS.md's "Where a single POST's CPU goes").
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  per_dialog = tonumber(args[1]) or 5
  n = 0
  base = (os.time() % 100000) * 1000000000 + tid * 100000000
  headers = { ["Content-Type"] = "application/json" }
  body = '{"text": "Hello, World", "language": "EN"}'
end

function request()
  local d = n % 256 + 256 * math.floor(n / (256 * per_dialog))
  n = n + 1
  return wrk.format("POST", "/data/" .. (d % 100) .. "/" .. (base + d), headers, body)
end

function done(summary, latency, requests)
  local non2xx = summary.errors.status
  io.write(string.format("non-2xx: %d\n", non2xx))
end
