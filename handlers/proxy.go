package handlers

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/proxy"
	"github.com/tidwall/gjson"
	"github.com/valyala/fasthttp"
	"golang.org/x/time/rate"

	"github.com/openai-idempotent-proxy/proxy/handlers/access"
	"github.com/openai-idempotent-proxy/proxy/handlers/scrub"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// ProxyConfig is what the proxy handler needs from the configuration.
type ProxyConfig struct {
	UpstreamBaseURL  *url.URL
	UpstreamAPIKey   string
	Secrets          []string       // every secret to mask in what the proxy sends, stores and logs
	UpstreamCAs      *x509.CertPool // nil: the system roots
	ClientKeys       []ClientKey
	Gate             ClientGate // nil: PROXY_API_KEYS only, no limits
	AllowOpenProxy   bool
	MaxBodySize      int64
	UpstreamTimeout  time.Duration
	FirstByteTimeout time.Duration
	IdleTimeout      time.Duration
	Egress           Egress // HTTPS_PROXY, HTTP_PROXY, NO_PROXY

	IdempotencyTTL     time.Duration
	IdempotencyLease   time.Duration
	IdempotencyMaxBody int64
	BufferMemoryLimit  int64 // 0: no bound (tests that build a Proxy by hand)
}

// LogSink receives one record per request; Record must never block.
type LogSink interface {
	Record(models.RequestLog) bool
}

// Proxy forwards /v1/* to the upstream API.
type Proxy struct {
	cfg        ProxyConfig
	auth       *Authenticator
	gate       ClientGate
	bearer     string // "Bearer <upstream key>", built once
	client     *fasthttp.Client
	buffers    *bufferBudget
	idem       IdempotencyStore // nil disables Idempotency-Key handling
	sink       LogSink
	metrics    *Metrics      // nil records nothing
	mask       *scrub.Masker // every configured secret
	logger     *slog.Logger
	background sync.WaitGroup // keyed requests finishing without their client, deferred writes
	claims     claimSet       // keyed attempts in flight, settled at shutdown
	// warnSometimes keeps a database outage from flooding the log.
	warnSometimes rate.Sometimes
}

// uncountedBody is the size below which a body read whole is not counted
// against BUFFER_MEMORY_LIMIT: small next to the per-connection buffers, and
// most requests.
const uncountedBody = 64 << 10

// inspectLimit bounds the JSON request bodies read to learn the model and
// whether the client asked for a stream. Larger bodies stream through
// unread (the log shows no model for them).
const inspectLimit = 32 << 20

// NewProxy builds the handler. idem may be nil (no idempotency), sink nil
// (no request log), m nil (no metrics).
func NewProxy(cfg ProxyConfig, idem IdempotencyStore, sink LogSink, m *Metrics, logger *slog.Logger) *Proxy {
	p := &Proxy{
		cfg:           cfg,
		auth:          NewAuthenticator(cfg.ClientKeys),
		bearer:        "Bearer " + cfg.UpstreamAPIKey,
		idem:          idem,
		sink:          sink,
		metrics:       m,
		logger:        logger,
		warnSometimes: rate.Sometimes{Interval: time.Second},
		buffers:       newBufferBudget(cmp.Or(cfg.BufferMemoryLimit, 1<<62)),
		mask:          scrub.New(append([]string{cfg.UpstreamAPIKey}, cfg.Secrets...)...),
	}
	m.bufferBytes(p.buffers)
	if p.gate = cfg.Gate; p.gate == nil {
		p.gate = access.New(context.Background(), access.Options{Env: p.auth.Authenticate})
	}
	dial := cfg.Egress.DialFunc(cfg.UpstreamBaseURL.Scheme == "https", 30*time.Second)
	p.client = &fasthttp.Client{
		Transport:                teeTransport{},
		StreamResponseBody:       true,
		NoDefaultUserAgentHeader: true,
		DisablePathNormalizing:   true,
		// No ReadTimeout: it would cut long streams. upstreamConn enforces
		// the first-byte and idle limits and the call's deadline.
		Dial: func(addr string) (net.Conn, error) {
			return dialUpstream(dial, addr, cfg.FirstByteTimeout, cfg.IdleTimeout)
		},
		TLSConfig:          &tls.Config{RootCAs: cfg.UpstreamCAs, MinVersion: tls.VersionTLS12},
		MaxConnsPerHost:    4096,
		MaxConnWaitTimeout: 30 * time.Second,
		// Most recently used first: the connection least likely to have
		// been closed by the upstream. Stale ones are found before use
		// (sendUpstream), so the idle limit only bounds what we hold.
		ConnPoolStrategy:    fasthttp.LIFO,
		MaxIdleConnDuration: 90 * time.Second,
		ReadBufferSize:      16 << 10, // larger header blocks get a larger buffer
		WriteBufferSize:     16 << 10,
	}
	return p
}

// Wait blocks until keyed requests that outlived their clients have been
// stored, or stop is closed; then it releases the keys still running.
func (p *Proxy) Wait(stop <-chan struct{}) {
	done := make(chan struct{})
	go func() { p.background.Wait(); close(done) }()
	select {
	case <-done:
	case <-stop:
	}
	p.releaseInFlight()
}

// Handle serves every /v1/* request.
func (p *Proxy) Handle(c *fiber.Ctx) error {
	ex := p.newExchange(c)
	if err := p.admit(c, ex); err != nil {
		return ex.reject(c, err)
	}
	if p.idem != nil && isIdempotentMethod(c.Method()) && len(idempotencyKeyFields(&c.Request().Header)) > 0 {
		return p.handleKeyed(c, ex)
	}
	return p.forward(c, ex)
}

// admit authenticates, normalises the path and checks the body size,
// before anything is read or sent upstream.
func (p *Proxy) admit(c *fiber.Ctx, ex *exchange) error {
	path, pathErr := normalisePath(string(c.Request().URI().PathOriginal()))
	ex.rec.Path = path // logged even when the request is refused below
	if pathErr != nil {
		ex.rec.Path = truncate(string(c.Request().URI().PathOriginal()), 200)
	}
	if !p.cfg.AllowOpenProxy || len(p.cfg.ClientKeys) > 0 {
		caller, err := p.gate.Authenticate(c.Request().Header.Peek("Authorization"))
		ex.caller, ex.rec.Client = caller, caller.Name
		if err != nil {
			return keyError(err)
		}
	} else {
		ex.rec.Client = "open"
	}
	if pathErr != nil {
		return pathErr
	}
	if !validHeaderNames(&c.Request().Header) {
		return errBadHeaderName
	}
	if m := c.Request().Header.Method(); string(m) == fiber.MethodTrace || string(m) == fiber.MethodConnect {
		// TRACE echoes the request (our key included) back; CONNECT is
		// not an API call.
		return errMethodNotAllowed
	}

	req := c.Request()
	size := req.Header.ContentLength()
	if int64(size) > p.cfg.MaxBodySize {
		lingerAndClose(c)
		return errBodyTooLarge
	}
	if req.IsBodyStream() && size < 0 {
		// Chunked upload: cut it off once it outgrows the limit.
		ex.bodyLimit = &limitedReader{r: req.BodyStream(), left: p.cfg.MaxBodySize}
		req.SetBodyStream(ex.bodyLimit, -1)
	}
	if size >= 0 {
		ex.rec.RequestBytes = int64(size)
	}
	if size >= 0 && size <= inspectLimit && isJSON(req.Header.ContentType()) {
		if req.IsBodyStream() && size > uncountedBody {
			// Read whole, so limits and the log know the model before
			// anything is forwarded; held within BUFFER_MEMORY_LIMIT.
			if !p.buffers.acquire(int64(size), admitWait) {
				c.Set(fiber.HeaderRetryAfter, "1")
				return errBuffersFull
			}
			ex.bodyReserved = int64(size)
		}
		body, err := bufferedBody(req, size) // bounded above
		if err != nil {
			c.Context().SetConnectionClose()
			return errBadBody
		}
		ex.rec.Model = truncate(gjson.GetBytes(body, "model").String(), 200)
		ex.rec.Stream = gjson.GetBytes(body, "stream").Bool()
		ex.ask = askOf(ex.rec.Model, body, size)
	}
	return refusalError(ex.caller.Permits(ex.rec.Model))
}

// forward sends the request upstream through Fiber's proxy middleware.
func (p *Proxy) forward(c *fiber.Ctx, ex *exchange) error {
	if err := p.admitLimits(c, ex); err != nil {
		return ex.reject(c, err)
	}
	req := c.Request()
	prepareUpstreamRequest(&req.Header, p.bearer)
	req.SetUserValue(exchangeKey{}, ex)
	if ex.claim == nil {
		ex.client = watchClientOf(c.Context().Conn())
	}
	target := upstreamURL(p.cfg.UpstreamBaseURL, ex.rec.Path, req.URI().QueryString())
	// The client resets the response, dropping headers that middleware
	// (CORS) set before the handler ran: keep them to put back.
	var pre fasthttp.ResponseHeader
	c.Response().Header.CopyTo(&pre)
	err := proxy.Do(c, target, p.client)
	req.SetUserValue(exchangeKey{}, nil)
	for k, v := range pre.All() {
		if bytes.HasPrefix(k, []byte("Access-Control-")) || bytes.Equal(k, []byte("Vary")) {
			c.Response().Header.SetBytesKV(k, v)
		}
	}
	ex.setRateLimitHeaders(&c.Response().Header)
	if err != nil {
		apiErr := p.upstreamError(c, err, ex)
		ex.finish(err)
		return WriteAPIError(c, apiErr)
	}
	if ex.sse {
		// Tell buffering reverse proxies in front of us (nginx) to pass
		// events through as they come.
		c.Set("X-Accel-Buffering", "no")
		c.Set("Cache-Control", "no-cache")
	}
	return nil
}

// maxErrorBody bounds how much of an upstream error body is read.
const maxErrorBody = 1 << 20

// errorBody reads an upstream error body (bounded) through the tee and
// ends the exchange.
func (p *Proxy) errorBody(t *tee) []byte {
	body, err := io.ReadAll(io.LimitReader(t, maxErrorBody))
	if err == nil && !t.eof {
		err = errErrorBodyTooLarge
	}
	if err != nil && t.readErr == nil {
		t.readErr = err
	}
	_ = t.CloseWithError(nil)
	return body
}

// maxDecoded bounds a decoded upstream body per coding stage; decoding
// holds no more memory than a read, so it only stops endless bombs.
const maxDecoded = 1 << 36

// identityBody returns the upstream body to read: decoded if the upstream
// compressed it (it was not asked to: Accept-Encoding is not forwarded),
// so that what passes can be masked, parsed for usage and stored, and the
// client gets it in identity encoding (h loses Content-Encoding and its
// length). A coding the proxy cannot undo is refused: it could hide a key.
func (p *Proxy) identityBody(up *fasthttp.Response, h *fasthttp.ResponseHeader) (io.Reader, io.Closer, error) {
	src := up.BodyStream()
	enc := strings.TrimSpace(string(up.Header.ContentEncoding()))
	if src == nil || enc == "" || strings.EqualFold(enc, "identity") {
		return src, nil, nil
	}
	decoded, err := scrub.Decode(enc, src, maxDecoded)
	if err != nil {
		return nil, nil, errUnsupportedEncoding
	}
	h.Del(fiber.HeaderContentEncoding)
	h.SetContentLength(-1)
	return decoded, decoded, nil
}

var errUnsupportedEncoding = errors.New("upstream answered in a content coding the proxy cannot decode")

// maskHeaders masks every secret in response header names and values.
// It reports whether it found one.
func (p *Proxy) maskHeaders(h *fasthttp.ResponseHeader) bool {
	var leaked []string
	for k, v := range h.All() {
		if p.mask.Contains(k) || p.mask.Contains(v) {
			leaked = append(leaked, string(k))
		}
	}
	if len(leaked) == 0 {
		return false
	}
	type field struct{ k, v string }
	var keep []field
	for k, v := range h.All() {
		for _, name := range leaked {
			if string(k) == name {
				keep = append(keep, field{p.mask.String(string(k)), p.mask.String(string(v))})
			}
		}
	}
	for _, name := range leaked {
		h.Del(name)
	}
	for _, f := range keep {
		h.Add(f.k, f.v)
	}
	return true
}

// upstreamError maps a failure before the response started.
func (p *Proxy) upstreamError(c *fiber.Ctx, err error, ex *exchange) *APIError {
	switch {
	case ex.bodyLimit != nil && ex.bodyLimit.exceeded:
		lingerAndClose(c)
		ex.status, ex.outcome = errBodyTooLarge.Status, errBodyTooLarge.Outcome
		return errBodyTooLarge
	case ex.bodyLimit != nil && ex.bodyLimit.err != nil:
		// The client's own upload broke (bad chunked framing, or it hung
		// up mid-body): not an upstream failure.
		c.Context().SetConnectionClose()
		ex.status, ex.outcome = errBadBody.Status, errBadBody.Outcome
		return errBadBody
	case errors.Is(err, errUnsupportedEncoding):
		p.metrics.upstreamError("unreachable")
		ex.status, ex.outcome = errUpstreamEncoding.Status, errUpstreamEncoding.Outcome
		return errUpstreamEncoding
	case errors.Is(err, errClientCancelled):
		ex.status, ex.outcome = errClientClosedRequest.Status, errClientClosedRequest.Outcome
		return errClientClosedRequest
	case isTimeout(err):
		p.metrics.upstreamError("first_byte_timeout")
		ex.status, ex.outcome = errUpstreamTimeout.Status, errUpstreamTimeout.Outcome
		return errUpstreamTimeout
	}
	p.metrics.upstreamError("unreachable")
	ex.status, ex.outcome = errUpstreamUnreachable.Status, errUpstreamUnreachable.Outcome
	return errUpstreamUnreachable
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, fasthttp.ErrTimeout) || errors.Is(err, os.ErrDeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// idempotencyKeyFields returns every Idempotency-Key field as received,
// empty ones included (an empty key is invalid, not absent). It reads the
// raw header block, because parsed headers drop empty values.
func idempotencyKeyFields(h *fasthttp.RequestHeader) [][]byte {
	var out [][]byte
	raw := h.RawHeaders()
	for len(raw) > 0 {
		line := raw
		if i := bytes.IndexByte(raw, '\n'); i >= 0 {
			line, raw = raw[:i], raw[i+1:]
		} else {
			raw = nil
		}
		name, value, ok := bytes.Cut(bytes.TrimRight(line, "\r"), []byte(":"))
		if ok && bytes.EqualFold(bytes.TrimSpace(name), []byte("Idempotency-Key")) {
			out = append(out, bytes.TrimSpace(value))
		}
	}
	return out
}

func isIdempotentMethod(m string) bool { return m == fiber.MethodPost || m == fiber.MethodPatch }

func isJSON(contentType []byte) bool {
	mt, _, err := mime.ParseMediaType(string(contentType))
	return err == nil && (mt == "application/json" || strings.HasSuffix(mt, "+json"))
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// lingerAndClose answers 413 to a client that may still be uploading and
// closes the connection the way net/http does: the answer is written, the
// write side shut, and unread input discarded for a moment, so the client
// reads the answer instead of a connection reset. The discard is bounded in
// bytes and time; the body itself is never processed. The response is
// written here, with Connection: close, because fasthttp skips hijack
// handlers on connections it closes itself.
func lingerAndClose(c *fiber.Ctx) {
	body, _ := json.Marshal(openAIErrorBody(errBodyTooLarge))
	c.Context().HijackSetNoResponse(true)
	c.Context().Hijack(func(conn net.Conn) {
		var resp fasthttp.Response
		resp.SetStatusCode(errBodyTooLarge.Status)
		resp.Header.SetContentType(fiber.MIMEApplicationJSON)
		resp.SetConnectionClose()
		resp.SetBodyRaw(body)
		w := bufio.NewWriter(conn)
		if resp.Write(w) != nil || w.Flush() != nil {
			return
		}
		if tc, ok := conn.(interface{ CloseWrite() error }); ok {
			_ = tc.CloseWrite()
		}
		_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, _ = io.Copy(io.Discard, io.LimitReader(conn, 64<<20))
	})
}

// bufferedBody reads a streamed body of a declared size into memory (unlike
// Request.Body, which forwards a read error's text as the body).
func bufferedBody(req *fasthttp.Request, size int) ([]byte, error) {
	if !req.IsBodyStream() {
		return req.Body(), nil
	}
	body := make([]byte, size)
	if _, err := io.ReadFull(req.BodyStream(), body); err != nil {
		return nil, err
	}
	req.SetBodyRaw(body)
	return body, nil
}

// limitedReader fails a chunked upload that outgrows MAX_BODY_SIZE.
type limitedReader struct {
	r        io.Reader
	left     int64
	n        int64
	exceeded bool
	err      error // the client's read error, if its upload broke
}

// bytesRead reports how many body bytes passed.
func (l *limitedReader) bytesRead() int64 { return l.n }

var errErrorBodyTooLarge = errors.New("upstream error body larger than 1 MiB")

var errBodyLimit = errors.New("request body exceeds MAX_BODY_SIZE")

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.err != nil {
		return 0, l.err // a broken upload stays broken: never end it cleanly
	}
	if l.left <= 0 {
		// One byte beyond the limit tells "exactly at" from "over".
		var one [1]byte
		if n, _ := l.r.Read(one[:]); n > 0 {
			l.exceeded = true
			return 0, errBodyLimit
		}
		return 0, io.EOF
	}
	if int64(len(p)) > l.left {
		p = p[:l.left]
	}
	n, err := l.r.Read(p)
	l.left -= int64(n)
	l.n += int64(n)
	if err != nil && !errors.Is(err, io.EOF) {
		l.err = err
	}
	return n, err
}
