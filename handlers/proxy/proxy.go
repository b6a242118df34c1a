package proxy

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/url"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	fiberproxy "github.com/gofiber/fiber/v2/middleware/proxy"
	"github.com/valyala/fasthttp"
	"golang.org/x/time/rate"

	"github.com/openai-idempotent-proxy/proxy/handlers"
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
	ClientKeys       []handlers.ClientKey
	Gate             handlers.ClientGate // nil: PROXY_API_KEYS only, no limits
	AllowOpenProxy   bool
	MaxBodySize      int64
	UpstreamTimeout  time.Duration
	FirstByteTimeout time.Duration
	IdleTimeout      time.Duration
	Egress           handlers.Egress // HTTPS_PROXY, HTTP_PROXY, NO_PROXY

	IdempotencyTTL     time.Duration
	IdempotencyLease   time.Duration
	IdempotencyMaxBody int64
	// IdempotencyJoinWait bounds how long a repeat of a running keyed
	// request waits for its answer (streams follow while it runs); 0
	// answers 409 at once instead of joining.
	IdempotencyJoinWait time.Duration
	BufferMemoryLimit   int64 // 0: no bound (tests that build a Proxy by hand)
	// StreamUsageOff (STREAM_USAGE=off) forwards streamed chat completions
	// as sent, for upstreams that refuse stream_options (stream_usage.go).
	StreamUsageOff bool
}

// LogSink receives one record per request; Record must never block.
type LogSink interface {
	Record(models.RequestLog) bool
}

// Proxy forwards /v1/* to the upstream API.
type Proxy struct {
	cfg     ProxyConfig
	auth    *handlers.Authenticator
	gate    handlers.ClientGate
	bearer  string           // "Bearer <upstream key>", built once
	clients *upstreamClients // lent to proxy.Do, one per request
	buffers *bufferBudget
	idem    IdempotencyStore // nil disables Idempotency-Key handling
	claims  claims           // the keys claimed by requests in flight
	out     recorder         // where finished exchanges go
	// background counts keyed requests finishing without their client,
	// and deferred writes.
	background sync.WaitGroup
	// warnSometimes keeps a database outage from flooding the log.
	warnSometimes rate.Sometimes
	claimTimeout  sharedTimeout      // bounds each claim of a key
	stop          context.CancelFunc // ends the relay's listener
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
		auth:          handlers.NewAuthenticator(cfg.ClientKeys),
		bearer:        "Bearer " + cfg.UpstreamAPIKey,
		idem:          idem,
		warnSometimes: rate.Sometimes{Interval: time.Second},
		claimTimeout:  sharedTimeout{d: 5 * time.Second},
		buffers:       newBufferBudget(cmp.Or(cfg.BufferMemoryLimit, 1<<62)),
		out:           recorder{sink: sink, metrics: m, logger: logger, mask: scrub.New(append([]string{cfg.UpstreamAPIKey}, cfg.Secrets...)...)},
	}
	p.claims = claims{store: idem, ttl: cfg.IdempotencyTTL, lease: cfg.IdempotencyLease, maxBody: cfg.IdempotencyMaxBody,
		buffers: p.buffers, metrics: m, logger: logger, sink: sink, background: &p.background, warn: &p.warnSometimes,
		writeTimeout: sharedTimeout{d: 2 * time.Second}}
	m.bufferBytes(p.buffers)
	var ctx context.Context
	ctx, p.stop = context.WithCancel(context.Background())
	if live, ok := idem.(LiveStore); ok && live.Shared() && cfg.IdempotencyJoinWait > 0 {
		p.claims.relay = newRelay(ctx, live, idem, &p.claims)
	}
	if p.gate = cfg.Gate; p.gate == nil {
		p.gate = access.New(context.Background(), access.Options{Env: p.auth.AuthenticateDigest})
	}
	p.out.cost = p.gate.CostMicros
	isTLS := cfg.UpstreamBaseURL.Scheme == "https"
	dial := cfg.Egress.DialFunc(isTLS, 30*time.Second)
	pool := &fasthttp.HostClient{
		Addr:  fasthttp.AddMissingPort(cfg.UpstreamBaseURL.Host, isTLS),
		IsTLS: isTLS,
		// No ReadTimeout: it would cut long streams. upstreamConn enforces
		// the first-byte and idle limits and the call's deadline.
		Dial: func(addr string) (net.Conn, error) {
			return dialUpstream(dial, addr, cfg.FirstByteTimeout, cfg.IdleTimeout)
		},
		TLSConfig:          &tls.Config{RootCAs: cfg.UpstreamCAs, MinVersion: tls.VersionTLS12},
		MaxConns:           4096,
		MaxConnWaitTimeout: 30 * time.Second,
		// Most recently used first: the connection least likely to have
		// been closed by the upstream. Stale ones are found before use
		// (sendUpstream), so the idle limit only bounds what we hold.
		ConnPoolStrategy:    fasthttp.LIFO,
		MaxIdleConnDuration: 90 * time.Second,
		ReadBufferSize:      16 << 10, // larger header blocks get a larger buffer
		WriteBufferSize:     16 << 10,
	}
	p.clients = &upstreamClients{pool: pool, metrics: m}
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
	p.claims.releaseInFlight()
	p.stop()
}

// Handle serves every /v1/* request.
func (p *Proxy) Handle(c *fiber.Ctx) error {
	ex := p.newExchange(c)
	if err := p.admit(c, ex); err != nil {
		return ex.reject(c, err)
	}
	if p.idem != nil && isIdempotentMethod(c.Method()) {
		var arr [2][]byte
		if fields := appendIdempotencyKeyFields(arr[:0], &c.Request().Header); len(fields) > 0 {
			return p.handleKeyed(c, ex, fields)
		}
	}
	return p.forward(c, ex)
}

// admit authenticates, normalises the path and checks the body size,
// before anything is read or sent upstream.
func (p *Proxy) admit(c *fiber.Ctx, ex *exchange) error {
	path, pathErr := handlers.NormalisePath(string(c.Request().URI().PathOriginal()))
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
		return handlers.ErrMethodNotAllowed
	}

	req := c.Request()
	size := req.Header.ContentLength()
	if int64(size) > p.cfg.MaxBodySize {
		lingerAndClose(c)
		return handlers.ErrBodyTooLarge
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
			return handlers.ErrBadBody
		}
		f := inspectBody(body)
		if f.duplicate != "" {
			return errDuplicateField(f.duplicate)
		}
		ex.rec.Model, ex.rec.Stream = truncate(f.model, 200), f.stream
		ex.ask = access.Request{Model: ex.rec.Model, BodyBytes: int64(size), MaxTokens: f.maxTokens}
	}
	return handlers.RefusalError(ex.caller.Permits(ex.rec.Model))
}

// forward sends the request upstream through Fiber's proxy middleware and
// takes the response over: headers cleaned and masked, the body decoded,
// masked and teed to the client (an error body read whole first).
func (p *Proxy) forward(c *fiber.Ctx, ex *exchange) error {
	if err := p.admitLimits(c, ex); err != nil {
		return ex.reject(c, err)
	}
	req, resp := c.Request(), c.Response()
	prepareUpstreamRequest(&req.Header, p.bearer)
	p.askStreamUsage(req, ex)
	if ex.claim == nil {
		ex.hop.client = watchClientOf(c.Context().Conn())
	}
	target := handlers.UpstreamURL(p.cfg.UpstreamBaseURL, ex.rec.Path, req.URI().QueryString())
	// The client resets the response, dropping headers that middleware
	// (CORS) set before the handler ran: keep them to put back.
	pre := corsHeaders(&resp.Header)

	// proxy.Do's round trip sends with this request's hop (its deadline,
	// the client to watch): the client lent here carries it.
	cli := p.clients.lend(&ex.hop)
	err := fiberproxy.Do(c, target, &cli.Client)
	p.clients.giveBack(cli)
	up := takeUpstream(resp) // nil without a body stream (HEAD, 204, 304)
	var src io.Reader
	var decoder io.Closer
	if err == nil {
		cleanResponseHeaders(&resp.Header)
		if src, decoder, err = p.identityBody(up, &resp.Header); err != nil {
			up.abandon()
			resp.Header.Reset() // none of the refused answer's headers
		}
	}
	restoreCORS(&resp.Header, pre)
	ex.setRateLimitHeaders(&resp.Header)
	if err != nil {
		apiErr := p.upstreamError(c, err, ex)
		ex.failure = apiErr
		ex.finish(err)
		return handlers.WriteAPIError(c, apiErr)
	}
	if p.maskHeaders(&resp.Header) {
		p.out.logger.Warn("upstream echoed a secret in a response header; masked")
	}
	ex.onHeaders(&resp.Header)
	if ex.sse {
		// Tell buffering reverse proxies in front of us (nginx) to pass
		// events through as they come.
		c.Set("X-Accel-Buffering", "no")
		c.Set("Cache-Control", "no-cache")
	}

	if src == nil {
		body := p.out.mask.Bytes(resp.Body())
		resp.SetBody(body)
		ex.observe(body)
		ex.bodyComplete()
		ex.finish(nil)
		return nil
	}
	// Every byte the client, the capture, the log or a page will see has
	// passed the mask: an upstream that echoes a key sends it nowhere.
	body, size := ex.withoutAskedUsage(p.out.mask.Reader(src), max(resp.Header.ContentLength(), -1))
	t := &tee{src: body, decoder: decoder, release: up.release, up: up.up, ex: ex, size: int64(size)}
	switch {
	case resp.StatusCode() >= 400:
		// Error bodies are small: read them whole, so a key echoed in
		// one is masked before anything is sent.
		resp.SetBody(errorBody(t))
	case !ex.sse && size >= 0 && size <= wholeBodyLimit:
		// Most answers: read whole, the connection back in the pool at
		// once, and headers and body go to the client in one write.
		body, err := wholeBody(t)
		if err != nil {
			resp.Header.Reset() // the cut answer's headers describe a body the client will not get
			restoreCORS(&resp.Header, pre)
			ex.setRateLimitHeaders(&resp.Header)
			return handlers.WriteAPIError(c, errUpstreamCut)
		}
		resp.SetBodyRaw(body)
	default:
		resp.SetBodyStream(t, size)
	}
	return nil
}

// wholeBodyLimit is the largest answer of known length read whole before it
// is sent; larger ones, SSE and chunked answers stream through. It is the
// size held without counting against BUFFER_MEMORY_LIMIT, as a request
// body read whole is.
const wholeBodyLimit = uncountedBody

// corsHeaders keeps a copy of the headers the CORS middleware set before
// the call, or nil when it set none (CORS_ALLOWED_ORIGINS unset, the usual
// case, costs no copy).
func corsHeaders(h *fasthttp.ResponseHeader) *fasthttp.ResponseHeader {
	for k := range h.All() {
		if isCORSHeader(k) {
			pre := new(fasthttp.ResponseHeader)
			h.CopyTo(pre)
			return pre
		}
	}
	return nil
}

func isCORSHeader(k []byte) bool {
	return bytes.HasPrefix(k, []byte("Access-Control-")) || bytes.Equal(k, []byte("Vary"))
}

// restoreCORS puts back the CORS headers of pre (nil: none).
func restoreCORS(h, pre *fasthttp.ResponseHeader) {
	if pre == nil {
		return
	}
	for k, v := range pre.All() {
		if isCORSHeader(k) {
			h.SetBytesKV(k, v)
		}
	}
}

func isIdempotentMethod(m string) bool { return m == fiber.MethodPost || m == fiber.MethodPatch }

// isJSON reports whether a Content-Type names JSON (application/json or a
// +json type), parameters aside; it runs for every request, so it does not
// allocate as mime.ParseMediaType does.
func isJSON(contentType []byte) bool {
	mt, _, _ := bytes.Cut(contentType, []byte(";"))
	mt = bytes.TrimSpace(mt)
	return bytes.EqualFold(mt, []byte("application/json")) ||
		(len(mt) > len("+json") && bytes.EqualFold(mt[len(mt)-len("+json"):], []byte("+json")))
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
	body := handlers.APIErrorBody(handlers.ErrBodyTooLarge)
	c.Context().HijackSetNoResponse(true)
	c.Context().Hijack(func(conn net.Conn) {
		var resp fasthttp.Response
		resp.SetStatusCode(handlers.ErrBodyTooLarge.Status)
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
