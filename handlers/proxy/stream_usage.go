package proxy

import (
	"io"

	"github.com/valyala/fasthttp"

	"github.com/openai-idempotent-proxy/proxy/handlers/usage"
)

// A streamed chat completion reports its usage only when the request asks
// for it (stream_options.include_usage). So that every stream can be
// priced and counted against its key's limits, the proxy asks upstream
// for it when the client did not, and hides the answer from that client,
// which sees what it asked for. The idempotency fingerprint is taken
// before (over what the client sent), and the capture replays after (what
// it saw).

// streamUsagePaths are the endpoints whose streams take stream_options.
var streamUsagePaths = map[string]bool{"/v1/chat/completions": true, "/v1/completions": true}

// askStreamUsage rewrites the body going upstream of a streamed request
// that did not ask for usage (STREAM_USAGE=inject, the default). The body
// was read whole by admit; the copy is held within BUFFER_MEMORY_LIMIT,
// and without room for it the request goes as it was (unpriced).
func (p *Proxy) askStreamUsage(req *fasthttp.Request, ex *exchange) {
	if p.cfg.StreamUsageOff || !ex.rec.Stream || ex.rec.Method != fasthttp.MethodPost || !streamUsagePaths[ex.rec.Path] || req.IsBodyStream() {
		return
	}
	body, ok := usage.AskForStreamUsage(req.Body())
	if !ok {
		return
	}
	if n := int64(len(body)); n > uncountedBody {
		if !p.buffers.acquire(n, 0) {
			return
		}
		ex.bodyReserved += n
	}
	req.SetBodyRaw(body) // Content-Length follows the body
	ex.usageAsked = true
}

// withoutAskedUsage wraps a successful stream whose usage the proxy asked
// for: the client (and the capture replayed to its retries) gets the
// stream without it, the usage parser gets every byte. Its length changes,
// so it goes chunked.
func (ex *exchange) withoutAskedUsage(body io.Reader, size int) (io.Reader, int) {
	if !ex.usageAsked || !ex.sse || ex.status >= 300 {
		return body, size
	}
	ex.usageHidden = true
	return usage.HideStreamUsage(body, &ex.stream), -1
}
