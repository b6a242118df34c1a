// Package wsproxy proxies WebSocket APIs under /v1 — the Realtime API and
// the Responses API's WebSocket mode — to the upstream, with the same key
// swap as the HTTP proxy: the client authenticates with its proxy key (an
// Authorization header, or the browser subprotocol
// "openai-insecure-api-key.<key>"), and upstream sees only the server's key.
//
// Frames are relayed as they arrive in both directions (text, binary,
// fragments, ping/pong); close codes pass through. Each session is one
// request-log row, with the token usage the upstream reports summed.
package wsproxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/fasthttp/websocket"
	"github.com/gofiber/fiber/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/handlers/scrub"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// Config is what the WebSocket proxy needs from the configuration.
type Config struct {
	UpstreamBaseURL *url.URL
	UpstreamAPIKey  string
	Secrets         []string       // every secret masked in what reaches the client (the upstream key always is)
	UpstreamCAs     *x509.CertPool // nil: the system roots
	ClientKeys      []handlers.ClientKey
	// Authenticate checks a client's "Bearer <key>" and names it; nil:
	// ClientKeys only. The app passes the access gate's, so managed keys
	// (and their revocation and expiry) hold for sessions too.
	Authenticate func(authorization []byte) (name string, err error)
	// Gate, when set, authenticates sessions in place of Authenticate and
	// counts them against their key's limits (limits.go).
	Gate           handlers.ClientGate
	AllowOpenProxy bool
	AllowedOrigins []string // CORS_ALLOWED_ORIGINS: browser origins allowed to open sessions, or "*"
	MaxMessageSize int64    // WS_MAX_MESSAGE_SIZE, each direction
	IdleTimeout    time.Duration
	Egress         handlers.Egress
}

// LogSink receives one record per session; Record must never block.
type LogSink interface {
	Record(models.RequestLog) bool
}

// Observer counts finished sessions in /metrics (proxy.Metrics).
type Observer interface {
	ObserveRequest(models.RequestLog)
}

// Proxy serves WebSocket upgrades under /v1.
type Proxy struct {
	cfg     Config
	auth    func(authorization []byte) (string, error)
	bearer  string
	dialer  websocket.Dialer
	sink    LogSink
	metrics Observer
	logger  *slog.Logger
	open    prometheus.Gauge
	mask    *scrub.Masker
	hold    int // the longest secret less one: what a streamed mask holds back

	mu       sync.Mutex
	sessions map[*session]struct{}
	closing  bool
	drained  chan struct{} // closed when closing and the last session ended
}

const (
	// handshakeTimeout bounds connecting to the upstream and its answer
	// to the upgrade, as the HTTP client's dial is bounded.
	handshakeTimeout = 30 * time.Second
	// closeGrace is how long a side may take to answer a close frame
	// before its connection is dropped.
	closeGrace = 5 * time.Second
	// bufferSize is each connection's read buffer and (pooled, held only
	// while a message is written) write buffer.
	bufferSize = 4 << 10
)

// writeBuffers is shared by every connection: a write buffer is taken only
// while a message is being written, so idle sessions hold none.
var writeBuffers = &sync.Pool{}

// New builds the handler. sink, metrics and reg may be nil.
func New(cfg Config, sink LogSink, metrics Observer, reg prometheus.Registerer, logger *slog.Logger) *Proxy {
	p := &Proxy{
		cfg:      cfg,
		auth:     cfg.Authenticate,
		bearer:   "Bearer " + cfg.UpstreamAPIKey,
		sink:     sink,
		metrics:  metrics,
		logger:   logger,
		sessions: map[*session]struct{}{},
		open: prometheus.NewGauge(prometheus.GaugeOpts{Name: "proxy_websocket_sessions",
			Help: "WebSocket sessions (Realtime, Responses WebSocket mode) open now."}),
	}
	if p.auth == nil {
		p.auth = handlers.NewAuthenticator(cfg.ClientKeys).Authenticate
	}
	if reg != nil {
		reg.MustRegister(p.open)
	}
	secrets := append([]string{cfg.UpstreamAPIKey}, cfg.Secrets...)
	p.mask = scrub.New(secrets...)
	p.hold = -1
	for _, s := range secrets {
		p.hold = max(p.hold, len(s)-1)
	}
	dial := cfg.Egress.DialFunc(cfg.UpstreamBaseURL.Scheme == "https", handshakeTimeout)
	p.dialer = websocket.Dialer{
		// The egress dialer does HTTPS_PROXY/NO_PROXY (CONNECT), like the
		// HTTP client; the library's own Proxy hook stays unused.
		NetDial:          func(_, addr string) (net.Conn, error) { return dial(addr) },
		TLSClientConfig:  &tls.Config{RootCAs: cfg.UpstreamCAs, MinVersion: tls.VersionTLS12},
		HandshakeTimeout: handshakeTimeout,
		ReadBufferSize:   bufferSize,
		WriteBufferSize:  bufferSize,
		WriteBufferPool:  writeBuffers,
		// Never permessage-deflate upstream: frames must stay readable
		// for usage and key scrubbing.
		EnableCompression: false,
	}
	return p
}

// Handle serves a WebSocket upgrade under /v1 and passes every other
// request on to the HTTP proxy.
func (p *Proxy) Handle(c *fiber.Ctx) error {
	if !websocket.FastHTTPIsWebSocketUpgrade(c.Context()) {
		return c.Next()
	}
	s := p.newSession(c)
	if err := p.admit(c, s); err != nil {
		return s.reject(c, err)
	}
	up, resp, err := p.dialUpstream(c, s)
	if err != nil {
		return s.upstreamRefused(c, resp, err)
	}
	s.upstream = up
	if !p.register(s) {
		_ = up.Close()
		return s.reject(c, errShuttingDown)
	}
	h := &c.Response().Header
	if proto := up.Subprotocol(); proto != "" {
		// The upstream's choice (e.g. "realtime"), never a key: only
		// subprotocols without one went upstream.
		h.Set("Sec-WebSocket-Protocol", proto)
	}
	for name, values := range resp.Header {
		if passedDown(name) {
			for _, v := range values {
				h.Add(name, p.scrubString(v))
			}
		}
	}
	upgrader := websocket.FastHTTPUpgrader{
		ReadBufferSize:  bufferSize,
		WriteBufferSize: bufferSize,
		WriteBufferPool: writeBuffers,
		CheckOrigin:     func(*fasthttp.RequestCtx) bool { return true }, // admit checked it
		Error:           func(*fasthttp.RequestCtx, int, error) {},       // admit checked the handshake
	}
	if err := upgrader.Upgrade(c.Context(), s.run); err != nil {
		p.unregister(s)
		_ = up.Close()
		return s.reject(c, errBadHandshake)
	}
	// fasthttp runs s.run only once the 101 answer is written; if that
	// fails, nothing else would close the upstream session.
	time.AfterFunc(handshakeTimeout, s.abandonIfNotStarted)
	return nil
}

// dialUpstream opens the upstream session: same path and query, the
// server's key, the client's subprotocols without the key.
func (p *Proxy) dialUpstream(c *fiber.Ctx, s *session) (*websocket.Conn, *http.Response, error) {
	target := handlers.UpstreamURL(p.cfg.UpstreamBaseURL, s.rec.Path, c.Request().URI().QueryString())
	target = "ws" + strings.TrimPrefix(target, "http") // http → ws, https → wss
	d := p.dialer
	d.Subprotocols = s.subprotocols
	header := upstreamHeader(&c.Request().Header)
	header.Set("Authorization", p.bearer)
	ctx, cancel := context.WithTimeout(context.Background(), handshakeTimeout)
	defer cancel()
	up, resp, err := d.DialContext(ctx, target, header)
	if err == nil && resp.Header.Get("Sec-WebSocket-Extensions") != "" {
		// We offered none; an upstream that imposes compression anyway
		// would make frames unreadable for usage and scrubbing.
		_ = up.Close()
		return nil, nil, errUnexpectedExtension
	}
	s.handshakeDone = time.Now()
	return up, resp, err
}

var (
	errUnexpectedExtension = errors.New("upstream negotiated a WebSocket extension that was not offered")
	errShuttingDown        = &handlers.APIError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "shutting_down", Outcome: models.OutcomeRejected,
		Message: "The proxy is shutting down; reconnect to another instance."}
)

// register counts a session in, unless the proxy is shutting down.
func (p *Proxy) register(s *session) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closing {
		return false
	}
	p.sessions[s] = struct{}{}
	p.open.Inc()
	return true
}

func (p *Proxy) unregister(s *session) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.sessions[s]; !ok {
		return
	}
	delete(p.sessions, s)
	p.open.Dec()
	if p.closing && len(p.sessions) == 0 && p.drained != nil {
		close(p.drained)
		p.drained = nil
	}
}

// Open reports how many sessions are open.
func (p *Proxy) Open() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.sessions)
}

// Shutdown refuses new sessions, lets open ones run until ctx ends
// (SHUTDOWN_GRACE), then closes those left with 1001 "going away" on both
// sides and waits for them to be logged.
func (p *Proxy) Shutdown(ctx context.Context) {
	p.mu.Lock()
	p.closing = true
	drained := make(chan struct{})
	if len(p.sessions) == 0 {
		close(drained)
	} else {
		p.drained = drained
	}
	p.mu.Unlock()
	select {
	case <-drained:
		return
	case <-ctx.Done():
	}
	p.mu.Lock()
	open := make([]*session, 0, len(p.sessions))
	for s := range p.sessions {
		open = append(open, s)
	}
	p.mu.Unlock()
	for _, s := range open {
		s.end(endShutdown)
	}
	select {
	case <-drained:
	case <-time.After(closeGrace + time.Second):
		p.logger.Warn("websocket sessions still closing after shutdown", "sessions", p.Open())
	}
}
