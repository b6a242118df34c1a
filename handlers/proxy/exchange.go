package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/tidwall/gjson"
	"github.com/valyala/fasthttp"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/handlers/access"
	"github.com/openai-idempotent-proxy/proxy/handlers/scrub"
	"github.com/openai-idempotent-proxy/proxy/handlers/usage"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// exchange is the state of one proxied request, from arrival to the last
// byte. It outlives the handler (the body is written after it returns), so
// it holds only copied values, never anything from fiber.Ctx. It ends in
// finish, once: build the record, settle the claim, emit.
type exchange struct {
	out       *recorder
	start     time.Time
	rec       models.RequestLog
	bodyLimit *limitedReader
	// bodyReserved is what a streamed JSON body read whole holds of
	// buffers (BUFFER_MEMORY_LIMIT), until the exchange ends.
	bodyReserved int64
	buffers      *bufferBudget

	// Set when upstream answers.
	status    int
	outcome   string // preset by errors; empty means judge at finish
	errText   string
	sse, json bool
	// closeDelimited: the body ends where upstream closes the connection
	// (no Content-Length, not chunked), so a cut looks like an end.
	closeDelimited bool
	headersAt      time.Time
	firstByte      time.Time
	respBytes      int64
	stream         usage.Stream
	tail           []byte // last bytes of a JSON body, for usage

	// usageAsked: the proxy asked upstream for this stream's usage;
	// usageHidden: it is hidden from what the client gets, and stream is
	// fed before the hiding (stream_usage.go).
	usageAsked, usageHidden bool

	claim      *claim             // set when this request holds an Idempotency-Key claim
	failure    *handlers.APIError // what the client got when the proxy answered with an error
	caller     access.Caller
	ask        access.Request // what limits need to know of the request
	ticket     *access.Ticket // the caller's limits held while forwarding
	clientGone bool

	hop hop // the round trip's deadline and client watch (upstream.go)

	finishOnce sync.Once
}

// recorder is where finished exchanges go: the request log, /metrics and
// the process log, every field a client or the upstream chose masked.
type recorder struct {
	sink    LogSink // nil: no request log
	metrics *Metrics
	logger  *slog.Logger
	mask    *scrub.Masker
	cost    func(model string, u models.TokenUsage) int64 // in micro-USD, by the price table
}

// tailKeep is how much of a JSON response's end is kept for usage.
const tailKeep = 64 << 10

func (p *Proxy) newExchange(c *fiber.Ctx) *exchange {
	now := time.Now()
	return &exchange{
		out:     &p.out,
		start:   now,
		buffers: p.buffers,
		hop:     hop{deadline: now.Add(p.cfg.UpstreamTimeout)},
		rec: models.RequestLog{
			CreatedAt: now.UTC(),
			Method:    string(c.Request().Header.Method()),
			ClientIP:  strings.Clone(c.IP()),
			UserAgent: truncate(string(c.Request().Header.UserAgent()), 300),
		},
	}
}

// reject answers a request the proxy refuses itself, and logs it.
func (ex *exchange) reject(c *fiber.Ctx, err error) error {
	apiErr := handlers.AsAPIError(err)
	ex.failure = apiErr
	ex.status, ex.outcome, ex.errText = apiErr.Status, apiErr.Outcome, apiErr.Code
	if ex.outcome == "" {
		ex.outcome = models.OutcomeRejected
	}
	ex.finish(nil)
	return handlers.WriteAPIError(c, apiErr)
}

// onHeaders runs when upstream's response headers arrive.
func (ex *exchange) onHeaders(h *fasthttp.ResponseHeader) {
	ex.headersAt = time.Now()
	ex.status = h.StatusCode()
	// The media type, parameters aside, as mime.ParseMediaType reads it but
	// without its copies.
	mt, _, _ := bytes.Cut(h.ContentType(), []byte(";"))
	mt = bytes.TrimSpace(mt)
	ex.sse = bytes.EqualFold(mt, []byte("text/event-stream"))
	ex.json = bytes.EqualFold(mt, []byte("application/json"))
	ex.closeDelimited = h.ContentLength() == -2 // fasthttp: -1 chunked, -2 read to the close
	if ex.sse {
		ex.rec.Stream = true
		ex.out.metrics.streamStarted()
	}
	ex.rec.UpstreamRequestID = truncate(string(h.Peek("X-Request-Id")), 200)
	if cl := ex.claim; cl != nil {
		cl.headers = map[string]string{}
		for k, v := range h.All() {
			if replayableHeader(k) {
				cl.headers[string(k)] = string(v)
			}
		}
		cl.expect(int64(h.ContentLength()))
		cl.feed.answered(feedHead{Status: ex.status, Headers: cl.headers, SSE: ex.sse})
	}
}

// observe sees every body byte on its way to the client.
func (ex *exchange) observe(p []byte) {
	if len(p) == 0 {
		return
	}
	if ex.firstByte.IsZero() {
		ex.firstByte = time.Now()
	}
	ex.respBytes += int64(len(p))
	switch {
	case ex.sse:
		if !ex.usageHidden { // else the stream saw the bytes before they were hidden
			_, _ = ex.stream.Write(p)
		}
	case ex.json && ex.claim == nil:
		ex.tail = append(ex.tail, p...)
		if len(ex.tail) > 2*tailKeep {
			ex.tail = append(ex.tail[:0], ex.tail[len(ex.tail)-tailKeep:]...)
		}
	}
	if ex.claim != nil {
		ex.claim.append(p)
	}
}

// bodyComplete runs once the whole upstream body has been read, before the
// client is shown its end: a client that retries the instant it has the
// full answer finds the record already stored.
func (ex *exchange) bodyComplete() {
	if ex.claim != nil {
		ex.settleClaim(true, nil)
	}
}

func (ex *exchange) keepsRunningWithoutClient() bool { return ex.claim != nil }

func (ex *exchange) captureOverflow() bool { return ex.claim != nil && ex.claim.overflow }

// settleClaim stores the response for replays or releases the key, once:
// complete says the whole body passed; err is how the exchange ended, if
// it has.
func (ex *exchange) settleClaim(complete bool, err error) {
	cl := ex.claim
	// How the attempt's joiners end: as its client did.
	end := feedCut
	switch {
	case !storable(ex.status) && (complete || cl.overflow):
		cl.release("upstream_status_" + strconv.Itoa(ex.status))
		end = feedClean // the client got the whole error answer; so do joiners
	case cl.overflow:
		cl.complete(ex.completion(nil, false)) // executed: answer retries with 410, never run it again
		end = feedLost
	case !complete:
		cl.release(releaseReason(err))
	case ex.sse && !ex.stream.Terminal():
		cl.release("stream_incomplete")
	case ex.json && ex.closeDelimited && !json.Valid(cl.capture):
		// Framed by the close (no Content-Length, not chunked) and cut
		// mid-way, a body looks whole to the transport; it is not valid
		// JSON. Only such bodies are checked: a cut in a body with a length
		// or chunks is an error the transport reports, and a whole body is
		// stored as it came, JSON or not.
		cl.release("body_incomplete")
	default:
		cl.complete(ex.completion(cl.capture, true))
		end = feedClean
	}
	cl.feed.ended(end, ex.failure)
}

// completion is what a claim stores of the answer. It is built only where
// it is stored: finish settles every claim a second time, a no-op once
// bodyComplete has.
func (ex *exchange) completion(body []byte, replayable bool) models.Completion {
	return models.Completion{Status: ex.status, Headers: storedHeaders(ex.claim.headers), Body: body,
		BodySize: ex.respBytes, Stream: ex.sse, Replayable: replayable}
}

// finish ends the exchange once: err is nil for a clean end, a
// *clientGoneError when the client left, or the upstream failure.
func (ex *exchange) finish(err error) {
	ex.finishOnce.Do(func() {
		rec, ttfb := ex.record(err)
		ex.ticket.Settle(rec.CostMicros, rec.TotalTokens) // the caller's limits, at the actual cost
		if ex.claim != nil {
			ex.settleClaim(false, err)
			ex.claim.end()
		}
		ex.buffers.release(ex.bodyReserved)
		ex.emit(rec, ttfb)
	})
}

// record completes the log row from what the exchange saw.
func (ex *exchange) record(err error) (*models.RequestLog, time.Duration) {
	rec := &ex.rec
	rec.Status = ex.status
	rec.DurationMs = time.Since(ex.start).Milliseconds()
	var ttfb time.Duration // zero: upstream never answered
	switch {
	case !ex.firstByte.IsZero():
		ttfb = ex.firstByte.Sub(ex.start)
	case !ex.headersAt.IsZero():
		ttfb = ex.headersAt.Sub(ex.start)
	}
	rec.TTFBMs = ttfb.Milliseconds()
	rec.ResponseBytes = ex.respBytes
	if u, ok := ex.usage(); ok {
		rec.PromptTokens, rec.CompletionTokens, rec.TotalTokens = u.PromptTokens, u.CompletionTokens, u.TotalTokens
		rec.CachedTokens, rec.ReasoningTokens = u.CachedTokens, u.ReasoningTokens
		rec.CostMicros = ex.out.cost(rec.Model, u.Priced())
	}
	if ex.bodyLimit != nil {
		rec.RequestBytes = ex.bodyLimit.bytesRead()
	}
	ex.out.maskRecord(rec)
	switch {
	case ex.outcome != "":
		rec.Outcome = ex.outcome
	case isClientGone(err) || ex.clientGone || ex.hop.cancelled.Load():
		rec.Outcome = models.OutcomeClientCancelled
	case err != nil:
		rec.Outcome = models.OutcomeUpstreamError
	default:
		rec.Outcome = models.OutcomeProxied
	}
	switch {
	case ex.errText != "":
		rec.Error = ex.errText
	case err != nil:
		rec.Error = truncate(ex.out.mask.String(err.Error()), 300)
	}
	return rec, ttfb
}

// emit hands the finished row to /metrics, the request log and the
// process log.
func (ex *exchange) emit(rec *models.RequestLog, ttfb time.Duration) {
	m := ex.out.metrics
	m.upstreamAnswered(ex) // an upstream 401 means OPENAI_API_KEY was refused
	if ex.sse {
		m.streamEnded()
	}
	if rec.Outcome == models.OutcomeUpstreamError && ex.status != 0 && ex.status < 500 {
		m.upstreamError("cut_mid_response")
	}
	m.observe(rec, ttfb)
	if ex.out.sink != nil && (ex.claim == nil || !ex.claim.loggedAtShutdown()) {
		ex.out.sink.Record(*rec)
	}
	level := slog.LevelDebug
	if rec.Outcome == models.OutcomeUpstreamError || rec.Status >= 500 {
		level = slog.LevelWarn
	}
	if !ex.out.logger.Enabled(context.Background(), level) {
		return // the attributes below cost allocations even when not logged
	}
	ex.out.logger.Log(context.Background(), level, "request",
		slog.String("method", rec.Method), slog.String("path", rec.Path), slog.Int("status", rec.Status),
		slog.String("outcome", rec.Outcome), slog.String("client", rec.Client), slog.Int64("ms", rec.DurationMs),
		slog.String("error", rec.Error))
}

// maskRecord masks secrets in what a client or the upstream chose and the
// log stores: a key sent as the model, the path, the Idempotency-Key or the
// User-Agent, or echoed as the upstream's request id.
func (r *recorder) maskRecord(rec *models.RequestLog) {
	for _, f := range []*string{&rec.Model, &rec.Path, &rec.UserAgent, &rec.IdempotencyKey, &rec.UpstreamRequestID, &rec.Error, &rec.Client} {
		*f = r.mask.String(*f)
	}
}

// usage reads token usage from what passed: the SSE events, the captured
// body of a keyed request, or the tail of a large JSON body. Each is in
// identity encoding: identityBody decodes the upstream's coding before
// any byte is seen.
func (ex *exchange) usage() (usage.Usage, bool) {
	switch {
	case ex.sse:
		u := ex.stream.Usage()
		return u, !u.IsZero()
	case !ex.json:
		return usage.Usage{}, false
	case ex.claim != nil && !ex.claim.overflow:
		return usage.FromJSON(ex.claim.capture)
	}
	return usage.FromTail(ex.tail)
}

func releaseReason(err error) string {
	switch {
	case err == nil:
		return "incomplete"
	case isTimeout(err):
		return "upstream_timeout"
	case isClientGone(err):
		return "client_gone"
	}
	return "upstream_error"
}

// storedHeaders encodes the allow-listed headers for the record: a JSON
// object, keys in order as encoding/json writes a map, each string escaped
// by gjson, whose decoded value is encoding/json's (invalid UTF-8 becomes
// U+FFFD). json.Marshal's reflection over the map cost 2.8% of a keyed
// request's CPU (issue 15).
func storedHeaders(h map[string]string) string {
	keys := make([]string, 0, len(h))
	for k := range h {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var buf [512]byte
	b := append(buf[:0], '{')
	for i, k := range keys {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendJSONString(b, k)
		b = append(b, ':')
		b = appendJSONString(b, h[k])
	}
	return string(append(b, '}'))
}

// appendJSONString appends s as a JSON string. Header values are nearly
// always printable ASCII with nothing to escape, which is copied as it
// is; anything else goes through gjson's escaping, a byte at a time,
// which was two thirds of storedHeaders' cost.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < ' ' || c > '~' || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			return gjson.AppendJSONString(b, s)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
