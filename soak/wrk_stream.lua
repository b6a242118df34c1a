-- wrk_stream.lua: a streamed (SSE) chat completion request for wrk; each
-- request reads one whole stream, so wrk's requests/s are streams/s.
--
--   wrk -t2 -c64 -d10s --latency -s soak/wrk_stream.lua http://127.0.0.1:8080/v1/chat/completions
--
-- The soak tests' fake upstream answers it with WRK_STREAM_EVENTS content
-- chunks (default 20) sent back to back, then the finish chunk, the usage
-- chunk and [DONE]. A real upstream ignores the X-Soak-* headers.
--
-- Environment:
--   WRK_CLIENT_KEY     the proxy client key sent as "Authorization: Bearer …"
--                      (default pk-soak-client-0123456789, the soak tests' key)
--   WRK_STREAM_EVENTS  content chunks per stream (default 20)

local client_key = os.getenv("WRK_CLIENT_KEY") or "pk-soak-client-0123456789"
local events = os.getenv("WRK_STREAM_EVENTS") or "20"

wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Hello"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. client_key
wrk.headers["X-Soak-Events"] = events
wrk.headers["X-Soak-Interval-Ms"] = "0"
