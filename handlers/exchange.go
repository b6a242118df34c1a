package handlers

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"mime"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/valyala/fasthttp"

	"github.com/openai-idempotent-proxy/proxy/handlers/access"
	"github.com/openai-idempotent-proxy/proxy/handlers/usage"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// exchange is the state of one proxied request, from arrival to the last
// byte. It outlives the handler (the body is written after it returns), so
// it holds only copied values, never anything from fiber.Ctx.
type exchange struct {
	p         *Proxy
	start     time.Time
	deadline  time.Time
	rec       models.RequestLog
	bodyLimit *limitedReader
	// bodyReserved is what a streamed JSON body read whole holds of
	// BUFFER_MEMORY_LIMIT, until the exchange ends.
	bodyReserved int64

	// Set when upstream answers.
	status    int
	outcome   string // preset by errors; empty means judge at finish
	errText   string
	sse, json bool
	encoding  string
	headersAt time.Time
	firstByte time.Time
	respBytes int64
	stream    usage.Stream
	tail      []byte // last bytes of a JSON body, for usage

	claim      *claim // set when this request holds an Idempotency-Key claim
	caller     access.Caller
	ask        access.Request // what limits need to know of the request
	ticket     *access.Ticket // the caller's limits held while forwarding
	clientGone bool

	// Unkeyed requests watch their client while the upstream has not begun
	// to answer (nothing is written then, so nothing else would notice it
	// leave) and cancel the call if it goes.
	upstream  *upstreamConn // the connection the answer comes on, once it has begun
	client    *clientConn
	stopWatch func()
	cancelled atomic.Bool

	completeOnce sync.Once
	finishOnce   sync.Once
}

// tailKeep is how much of a JSON response's end is kept for usage.
const tailKeep = 64 << 10

func (p *Proxy) newExchange(c *fiber.Ctx) *exchange {
	now := time.Now()
	return &exchange{
		p:        p,
		start:    now,
		deadline: now.Add(p.cfg.UpstreamTimeout),
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
	apiErr := AsAPIError(err)
	ex.status, ex.outcome, ex.errText = apiErr.Status, apiErr.Outcome, apiErr.Code
	if ex.outcome == "" {
		ex.outcome = models.OutcomeRejected
	}
	ex.finish(nil)
	return WriteAPIError(c, apiErr)
}

// onHeaders runs when upstream's response headers arrive.
func (ex *exchange) onHeaders(h *fasthttp.ResponseHeader) {
	ex.headersAt = time.Now()
	ex.status = h.StatusCode()
	mt, _, _ := mime.ParseMediaType(string(h.ContentType()))
	ex.sse = mt == "text/event-stream"
	ex.json = mt == "application/json"
	if ex.sse {
		ex.rec.Stream = true
		ex.p.metrics.streamStarted()
	}
	ex.encoding = strings.ToLower(string(h.ContentEncoding()))
	ex.rec.UpstreamRequestID = truncate(string(h.Peek("X-Request-Id")), 200)
	if cl := ex.claim; cl != nil {
		cl.headers = map[string]string{}
		for k, v := range h.All() {
			if name := string(k); replayableHeader(name) {
				cl.headers[name] = string(v)
			}
		}
		switch size := int64(h.ContentLength()); {
		case size > ex.p.cfg.IdempotencyMaxBody:
			ex.dropCapture()
		case size > 0 && !ex.growCapture(size, true): // known: one exact buffer
			ex.dropCapture()
		}
	}
}

// clientConn is the client's connection, for watching it leave.
type clientConn struct {
	conn net.Conn
	raw  syscall.RawConn
}

// watchClientOf returns the client connection to watch, or nil where the
// socket cannot be peeked at.
func watchClientOf(conn net.Conn) *clientConn {
	sc, ok := conn.(syscall.Conn)
	if !canPeek || !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return &clientConn{conn: conn, raw: raw}
}

// watchClient closes the upstream connection if the client closes its own
// while the call waits for the upstream. It only peeks, so the bytes of a
// pipelined next request stay for the server (and end the watch).
func (ex *exchange) watchClient(upstream net.Conn) (stop func()) {
	cc := ex.client
	if cc == nil {
		return func() {}
	}
	if uc := upstreamConnOf(upstream); uc != nil {
		upstream = uc.Conn // close the socket itself, not a TLS layer that would write
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if awaitReadable(cc.raw) == socketClosed {
			ex.cancelled.Store(true)
			_ = upstream.Close()
		}
	}()
	return func() {
		_ = cc.conn.SetReadDeadline(time.Unix(1, 0)) // wakes the watcher
		<-done
		_ = cc.conn.SetReadDeadline(time.Time{}) // the server sets its own before the next read
	}
}

// endWatch stops watching the client, once the answer has begun.
func (ex *exchange) endWatch() {
	if ex.stopWatch != nil {
		ex.stopWatch()
		ex.stopWatch = nil
	}
}

// maskRecord masks secrets in what a client or the upstream chose and the
// log stores: a key sent as the model, the path, the Idempotency-Key or the
// User-Agent, or echoed as the upstream's request id.
func (p *Proxy) maskRecord(rec *models.RequestLog) {
	for _, f := range []*string{&rec.Model, &rec.Path, &rec.UserAgent, &rec.IdempotencyKey, &rec.UpstreamRequestID, &rec.Error, &rec.Client} {
		*f = p.mask.String(*f)
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
		_, _ = ex.stream.Write(p)
	case ex.json && ex.claim == nil:
		ex.tail = append(ex.tail, p...)
		if len(ex.tail) > 2*tailKeep {
			ex.tail = append(ex.tail[:0], ex.tail[len(ex.tail)-tailKeep:]...)
		}
	}
	if cl := ex.claim; cl != nil && !cl.overflow {
		need := int64(len(cl.capture) + len(p))
		if need > ex.p.cfg.IdempotencyMaxBody || (need > int64(cap(cl.capture)) && !ex.growCapture(need, false)) {
			ex.dropCapture()
		} else {
			cl.capture = append(cl.capture, p...)
		}
	}
}

// growCapture makes room for need bytes of a keyed response, within
// BUFFER_MEMORY_LIMIT: it reserves what the larger buffer adds (waiting a
// little, which pauses this stream) and moves the capture into it. exact
// (the Content-Length is known) allocates need and no more; otherwise the
// buffer at least doubles, so a long stream is copied a few times only.
func (ex *exchange) growCapture(need int64, exact bool) bool {
	cl := ex.claim
	size := need
	if !exact {
		size = min(max(need, 2*int64(cap(cl.capture)), captureStep), ex.p.cfg.IdempotencyMaxBody)
	}
	if more := size - cl.reserved; more > 0 {
		if !ex.p.buffers.acquire(more, growWait) {
			ex.p.logger.Warn("BUFFER_MEMORY_LIMIT reached: a keyed response is delivered but not stored; retries get 410", "key_id", cl.id)
			return false
		}
		cl.reserved = size
	}
	grown := make([]byte, len(cl.capture), size)
	copy(grown, cl.capture)
	cl.capture = grown
	return true
}

// dropCapture gives up storing the response (too large, or no memory):
// the attempt still counts as executed, so retries get 410.
func (ex *exchange) dropCapture() {
	cl := ex.claim
	cl.overflow, cl.capture = true, nil
	cl.freeCapture(ex.p)
}

// bodyComplete runs once the whole upstream body has been read, before the
// client is shown its end.
func (ex *exchange) bodyComplete() {
	ex.completeOnce.Do(func() {
		if ex.claim != nil {
			ex.settle(true)
		}
	})
}

func (ex *exchange) keepsRunningWithoutClient() bool { return ex.claim != nil }

func (ex *exchange) captureOverflow() bool { return ex.claim != nil && ex.claim.overflow }

// finish records the exchange once: err is nil for a clean end, a
// *clientGoneError when the client left, or the upstream failure.
func (ex *exchange) finish(err error) {
	ex.finishOnce.Do(func() {
		end := time.Now()
		rec := &ex.rec
		rec.Status = ex.status
		ex.p.metrics.upstreamAnswered(ex) // an upstream 401 means OPENAI_API_KEY was refused
		rec.DurationMs = end.Sub(ex.start).Milliseconds()
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
		}
		rec.CostMicros = ex.p.gate.CostMicros(rec.Model, models.TokenUsage{Input: rec.PromptTokens, CachedInput: rec.CachedTokens, Output: rec.CompletionTokens})
		ex.ticket.Settle(rec.CostMicros, rec.TotalTokens)
		if ex.bodyLimit != nil {
			rec.RequestBytes = ex.bodyLimit.bytesRead()
		}
		ex.p.maskRecord(rec)
		var gone *clientGoneError
		switch {
		case ex.outcome != "":
			rec.Outcome = ex.outcome
		case errors.As(err, &gone) || ex.clientGone || ex.cancelled.Load():
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
			rec.Error = truncate(ex.p.mask.String(err.Error()), 300)
		}
		if ex.claim != nil {
			if ex.claim.overflow {
				ex.settle(false) // executed: answer retries with 410, never run it again
			} else {
				ex.release(releaseReason(err))
			}
			ex.claim.stopRenewal()
		}
		ex.p.buffers.release(ex.bodyReserved)
		if ex.sse {
			ex.p.metrics.streamEnded()
		}
		if rec.Outcome == models.OutcomeUpstreamError && ex.status != 0 && ex.status < 500 {
			ex.p.metrics.upstreamError("cut_mid_response")
		}
		ex.p.metrics.observe(rec, ttfb)
		if ex.p.sink != nil && !ex.loggedAtShutdown() {
			ex.p.sink.Record(*rec)
		}
		level := slog.LevelDebug
		if rec.Outcome == models.OutcomeUpstreamError || rec.Status >= 500 {
			level = slog.LevelWarn
		}
		ex.p.logger.Log(context.Background(), level, "request",
			slog.String("method", rec.Method), slog.String("path", rec.Path), slog.Int("status", rec.Status),
			slog.String("outcome", rec.Outcome), slog.String("client", rec.Client), slog.Int64("ms", rec.DurationMs),
			slog.String("error", rec.Error))
	})
}

// usage reads token usage from what passed: the SSE events, the captured
// body of a keyed request, or the tail of a large JSON body.
func (ex *exchange) usage() (usage.Usage, bool) {
	if ex.sse {
		u := ex.stream.Usage()
		return u, !u.IsZero()
	}
	if !ex.json {
		return usage.Usage{}, false
	}
	if ex.claim != nil && !ex.claim.overflow {
		body := ex.claim.capture
		if ex.encoding == "gzip" {
			body = gunzip(body)
		}
		return usage.FromJSON(body)
	}
	if ex.encoding != "" && ex.encoding != "identity" {
		return usage.Usage{}, false // a compressed tail cannot be read
	}
	return usage.FromTail(ex.tail)
}

// gunzip decompresses a captured body for usage parsing, bounded.
func gunzip(b []byte) []byte {
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		return nil
	}
	out, _ := io.ReadAll(io.LimitReader(zr, 64<<20))
	return out
}

func releaseReason(err error) string {
	var gone *clientGoneError
	switch {
	case err == nil:
		return "incomplete"
	case isTimeout(err):
		return "upstream_timeout"
	case errors.As(err, &gone):
		return "client_gone"
	}
	return "upstream_error"
}

// storedHeaders encodes the allow-listed headers for the record.
func storedHeaders(h map[string]string) string {
	b, err := json.Marshal(h)
	if err != nil {
		return "{}"
	}
	return string(b)
}
