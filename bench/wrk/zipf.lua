-- Keys drawn from a Zipf distribution: key of rank r is chosen with probability
-- proportional to 1 / r^s. A few hot keys, a long tail of rare ones.
--   args[1]  number of keys (default 10000)
--   args[2]  exponent s (default 1.1)
--   args[3]  first key number (default 2000000000); rank r is key "k-<first + r>"
--   args[4]  "sweep": send every rank once, in order (then again), to warm a cache
dofile((os.getenv("BENCH_LUA_DIR") or "bench/wrk") .. "/report.lua")

local next_thread = 0

function setup(thread)
   thread:set("thread_id", next_thread)
   next_thread = next_thread + 1
end

function init(args)
   n_keys = tonumber(args[1] or "10000")
   local s = tonumber(args[2] or "1.1")
   base = tonumber(args[3] or "2000000000")
   cdf = {}
   local total = 0
   for rank = 1, n_keys do
      total = total + 1 / (rank ^ s)
      cdf[rank] = total
   end
   for rank = 1, n_keys do
      cdf[rank] = cdf[rank] / total
   end
   -- A fixed seed per thread: every run sends the same key sequence.
   math.randomseed(1234567 + thread_id)
   requests = {}
   sweep = args[4] == "sweep"
   cursor = 0
end

function request()
   if sweep then
      cursor = cursor % n_keys + 1
      return wrk.format(nil, nil, {["X-API-Key"] = "k-" .. (base + cursor)})
   end
   local u = math.random()
   local lo, hi = 1, n_keys
   while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if cdf[mid] < u then lo = mid + 1 else hi = mid end
   end
   local req = requests[lo]
   if req == nil then
      req = wrk.format(nil, nil, {["X-API-Key"] = "k-" .. (base + lo)})
      requests[lo] = req
   end
   return req
end
