-- Every request carries a key the proxy has never seen, so every request is a
-- cache miss and one tower call.
--   args[1]  first key number (default 1000000000); keys are "k-<number>"
--   args[2]  keys per thread (default 0 = no limit, run until -d): when set,
--            the thread stops after that many answers, so exactly that many
--            distinct keys are sent (used to fill the cache to a known size)
dofile((os.getenv("BENCH_LUA_DIR") or "bench/wrk") .. "/report.lua")

local next_thread = 0

function setup(thread)
   thread:set("thread_id", next_thread)
   next_thread = next_thread + 1
end

-- Thread key ranges never overlap.
local SPAN = 100000000

function init(args)
   base = tonumber(args[1] or "1000000000") + thread_id * SPAN
   quota = tonumber(args[2] or "0")
   sent = 0
   answered = 0
   if quota > 0 then
      -- Requests still sent past the quota (in flight when the thread stops)
      -- repeat the first key, which by then is cached: no extra distinct key.
      repeat_request = wrk.format(nil, nil, {["X-API-Key"] = "k-" .. (base + 1)})
      response = function(status, headers, body)
         answered = answered + 1
         if answered >= quota then
            wrk.thread:stop()
         end
      end
   end
end

function request()
   sent = sent + 1
   if quota > 0 and sent > quota then
      return repeat_request
   end
   return wrk.format(nil, nil, {["X-API-Key"] = "k-" .. (base + sent)})
end
