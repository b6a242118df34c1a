-- wrk_chat.lua: a small, non-streamed chat completion request for wrk.
--
--   wrk -t2 -c64 -d30s --latency -s soak/wrk_chat.lua http://127.0.0.1:8080/v1/chat/completions
--
-- Environment:
--   WRK_CLIENT_KEY  the proxy client key sent as "Authorization: Bearer …"
--                   (default pk-soak-client-0123456789, the soak tests' key)
--   WRK_KEYED=1     add a unique Idempotency-Key to every request, so each
--                   one is claimed and stored in the idempotency table
--   WRK_KEY=<key>   send this one Idempotency-Key with every request: the
--                   first executes, all others are replays of it

local client_key = os.getenv("WRK_CLIENT_KEY") or "pk-soak-client-0123456789"
local keyed = os.getenv("WRK_KEYED") == "1"
local fixed_key = os.getenv("WRK_KEY")

wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. client_key
if fixed_key and fixed_key ~= "" then
  wrk.headers["Idempotency-Key"] = fixed_key
end

local threads = 0

-- setup runs in the main Lua state once per thread: number the threads so
-- their keys never collide.
function setup(thread)
  threads = threads + 1
  thread:set("thread_id", threads)
end

local prefix = ""
local counter = 0

function init(args)
  math.randomseed(os.time() + (thread_id or 0))
  prefix = string.format("wrk-%d-%d-%d-", os.time(), thread_id or 0, math.random(1, 1000000000))
end

if keyed then
  -- Defining request makes wrk build every request anew, which costs a
  -- little client CPU; without a key the prebuilt request is reused.
  function request()
    counter = counter + 1
    wrk.headers["Idempotency-Key"] = prefix .. counter
    return wrk.format()
  end
end
