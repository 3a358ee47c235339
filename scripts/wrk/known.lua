-- wrk: POST /data/{customerId}/{dialogId} to dialogs Redis already knows: as single.lua,
-- but 1000 messages a dialog, so after each thread's first 256 requests only 1 request
-- in 1000 starts a dialog (no second script call, no PostgreSQL lookup). For
-- diagnosis: BENCHMARKS.md's "only known dialogs" row (scripts/cpu-per-request PORT known.lua).
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  n = 0
  base = (os.time() % 100000) * 1000000000 + tid * 100000000
  headers = { ["Content-Type"] = "application/json" }
  body = '{"text": "Hello, World", "language": "EN"}'
end

function request()
  local d = n % 256 + 256 * math.floor(n / (256 * 1000))
  n = n + 1
  return wrk.format("POST", "/data/" .. (d % 100) .. "/" .. (base + d), headers, body)
end

function done(summary, latency, requests)
  local non2xx = summary.errors.status
  io.write(string.format("non-2xx: %d\n", non2xx))
end
