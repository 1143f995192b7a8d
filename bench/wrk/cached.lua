-- One key for the whole run (first script argument, default "k-1"): after the
-- first request every lookup in the gateway is a cache hit.
dofile((os.getenv("BENCH_LUA_DIR") or "bench/wrk") .. "/report.lua")

function init(args)
   -- Set before wrk builds its request once, so request() costs nothing.
   wrk.headers["X-API-Key"] = args[1] or "k-1"
end
