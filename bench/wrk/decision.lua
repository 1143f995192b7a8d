-- wrk straight at the decision listener's /auth, as nginx's auth_request asks it: one
-- cached key (first argument), the original request GET / and the decision token
-- (second argument). After the first request every decision is a cache hit.
dofile((os.getenv("BENCH_LUA_DIR") or "bench/wrk") .. "/report.lua")

function init(args)
   wrk.path = "/auth"
   wrk.headers["X-API-Key"] = args[1] or "k-1"
   wrk.headers["X-Original-Method"] = "GET"
   wrk.headers["X-Original-URI"] = "/"
   wrk.headers["X-Tower-Gateway-Decision-Token"] = args[2] or ""
end
