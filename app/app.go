// Package app wires the proxy together: configuration, logging, database,
// routes, background jobs, and an orderly start and stop.
package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/valyala/fasthttp"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/handlers/access"
	"github.com/openai-idempotent-proxy/proxy/handlers/dashboard"
	"github.com/openai-idempotent-proxy/proxy/handlers/proxy"
	"github.com/openai-idempotent-proxy/proxy/handlers/wsproxy"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// Run is the whole program; main only turns its result into an exit code.
func Run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "healthcheck":
			return Healthcheck(ctx, getenv, stderr)
		case "help", "-h", "-help", "--help":
			printUsage(stdout)
			return 0
		default:
			fmt.Fprintf(stderr, "unknown command %q\n\n", args[0])
			printUsage(stderr)
			return 2
		}
	}
	cfg, err := LoadConfig(getenv)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	logger := NewLogger(cfg, stderr)
	setMemoryLimit(cfg, getenv)
	// Listen first: a port in use is then the one line printed, before
	// the database is opened or any background job has started.
	ln, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		logger.Error("listen failed", "addr", cfg.ListenAddr, "error", err.Error())
		return 1
	}
	a, err := New(ctx, cfg, logger)
	if err != nil {
		_ = ln.Close()
		logger.Error("start failed", "error", err.Error())
		return 1
	}
	if err := a.Serve(ctx, ln); err != nil {
		logger.Error("stopped with error", "error", err.Error())
		return 1
	}
	return 0
}

func printUsage(w io.Writer) {
	fmt.Fprintln(w, "usage: proxy [healthcheck]")
	fmt.Fprintln(w, "\nWithout a command the proxy serves. Settings come from the environment:")
	for _, s := range Settings() {
		fmt.Fprintf(w, "  %-28s %s (default %q)\n", s.Name, s.Help, s.Default)
	}
}

// App is a configured proxy with its database and background jobs.
type App struct {
	cfg     Config
	logger  *slog.Logger
	Fiber   *fiber.App
	Store   *models.Store
	Logs    *models.LogWriter
	Proxy   *proxy.Proxy
	WS      *wsproxy.Proxy
	Metrics *proxy.Metrics
	Gate    *access.Gate

	stopJobs context.CancelFunc
	jobs     sync.WaitGroup
}

// New opens the database (migrating it) and builds the Fiber app.
func New(ctx context.Context, cfg Config, logger *slog.Logger) (*App, error) {
	// The dashboard's templates are parsed first: Fiber takes the engine
	// at creation, and a broken template must stop start-up.
	var views fiber.Views
	if cfg.AdminPassword != "" {
		engine, err := dashboard.NewViews()
		if err != nil {
			return nil, err
		}
		views = engine
	}
	store, err := models.Open(ctx, models.Options{DatabaseURL: cfg.DatabaseURL, DataDir: cfg.DataDir, Logger: logger})
	if err != nil {
		return nil, err
	}
	a := &App{cfg: cfg, logger: logger, Store: store}
	a.Logs = models.NewLogWriter(store, models.LogWriterOptions{QueueSize: cfg.LogQueueSize, Logger: logger})
	a.Metrics = newMetrics(store, a.Logs, logger)
	env := handlers.NewAuthenticator(cfg.ClientKeys)
	a.Gate = access.New(ctx, access.Options{Store: store, Env: env.AuthenticateDigest, Prices: cfg.Prices,
		ReserveTokens: cfg.ReserveTokens, Now: store.Now, Logger: logger})
	a.Proxy = proxy.NewProxy(proxy.ProxyConfig{
		Gate:                a.Gate,
		UpstreamBaseURL:     cfg.UpstreamBaseURL,
		UpstreamAPIKey:      cfg.UpstreamAPIKey,
		Secrets:             cfg.Secrets(),
		UpstreamCAs:         cfg.UpstreamCAs,
		ClientKeys:          cfg.ClientKeys,
		AllowOpenProxy:      cfg.AllowOpenProxy,
		MaxBodySize:         cfg.MaxBodySize,
		UpstreamTimeout:     cfg.UpstreamTimeout,
		FirstByteTimeout:    cfg.FirstByteTimeout,
		IdleTimeout:         cfg.IdleTimeout,
		Egress:              cfg.Egress,
		IdempotencyTTL:      cfg.IdempotencyTTL,
		IdempotencyLease:    cfg.IdempotencyLease,
		IdempotencyMaxBody:  cfg.IdempotencyMaxBody,
		IdempotencyJoinWait: cfg.IdempotencyJoinWait,
		BufferMemoryLimit:   cfg.BufferMemoryLimit,
		StreamUsageOff:      cfg.StreamUsageOff,
	}, store, a.Logs, a.Metrics, logger)
	a.WS = wsproxy.New(wsproxy.Config{
		UpstreamBaseURL: cfg.UpstreamBaseURL,
		UpstreamAPIKey:  cfg.UpstreamAPIKey,
		Secrets:         cfg.Secrets(),
		UpstreamCAs:     cfg.UpstreamCAs,
		ClientKeys:      cfg.ClientKeys,
		Gate:            a.Gate, // managed keys, their revocation, expiry and limits
		AllowOpenProxy:  cfg.AllowOpenProxy,
		AllowedOrigins:  cfg.CORSAllowedOrigins,
		MaxMessageSize:  cfg.WSMaxMessageSize,
		IdleTimeout:     cfg.WSIdleTimeout,
		Egress:          cfg.Egress,
	}, a.Logs, a.Metrics, a.Metrics.Registry, logger)
	a.Fiber = fiber.New(fiber.Config{
		AppName:               "openai-proxy",
		DisableStartupMessage: true,
		// Bodies above BodyLimit reach the handler as a stream instead of
		// being read whole; MAX_BODY_SIZE is enforced by the proxy itself.
		StreamRequestBody:            true,
		DisablePreParseMultipartForm: true,
		BodyLimit:                    4 << 20,
		ReadBufferSize:               32 << 10, // also the header size limit
		// fasthttp's ReadTimeout runs from a new connection's accept, or
		// from the first byte after a keep-alive wait, to the end of the
		// headers; requestTimeouts then gives the body its own bound.
		ReadTimeout: cfg.RequestHeaderTimeout,
		IdleTimeout: 2 * time.Minute,
		// No WriteTimeout here: requestTimeouts sets UPSTREAM_TIMEOUT per request.
		ErrorHandler:            errorHandler(logger),
		Views:                   views, // nil unless the dashboard is enabled
		EnableTrustedProxyCheck: len(cfg.TrustedProxies) > 0,
		TrustedProxies:          cfg.TrustedProxies,
		ProxyHeader:             proxyHeader(cfg),
	})
	srv := a.Fiber.Server()
	srv.HeaderReceived = requestTimeouts(cfg.RequestReadTimeout, cfg.UpstreamTimeout)
	// Requests that fail before a handler runs are answered in OpenAI's
	// shape, never quoting the request (its Authorization) back.
	srv.ErrorHandler = handlers.ServerErrorHandler
	srv.SecureErrorLogMessage = true
	srv.Handler = handlers.RejectUnknownMethods(srv.Handler)
	a.routes()
	a.startJobs()
	a.announce()
	return a, nil
}

// setMemoryLimit gives the Go runtime a soft memory limit, unless
// GOMEMLIMIT sets one: twice BUFFER_MEMORY_LIMIT plus room for the rest of
// the process. Live memory is bounded by BUFFER_MEMORY_LIMIT; without a
// limit the collector lets garbage grow to as much again before it runs
// (GOGC), so a burst of large captures doubled the process's size.
func setMemoryLimit(cfg Config, getenv func(string) string) {
	if getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(2*cfg.BufferMemoryLimit + 128<<20)
	}
}

// requestTimeouts runs once a request's headers are in. It moves the
// connection's read deadline from REQUEST_HEADER_TIMEOUT (which bounds a
// client that never finishes its headers) to read, REQUEST_READ_TIMEOUT, for
// the body, which may be a long upload. deliver bounds how long the response
// may take to reach the client once it starts: without it, a client that
// stops reading would hold its connection, and a keyed request its lease,
// for as long as it keeps the socket open. It is UPSTREAM_TIMEOUT: no
// answer is meant to last longer.
func requestTimeouts(read, deliver time.Duration) func(*fasthttp.RequestHeader) fasthttp.RequestConfig {
	return func(*fasthttp.RequestHeader) fasthttp.RequestConfig {
		return fasthttp.RequestConfig{ReadTimeout: read, WriteTimeout: deliver}
	}
}

func proxyHeader(cfg Config) string {
	if len(cfg.TrustedProxies) > 0 {
		return fiber.HeaderXForwardedFor
	}
	return ""
}

// announce logs how the proxy is set up, loudly where it is unsafe.
func (a *App) announce() {
	db := "sqlite (" + a.cfg.DataDir + ")"
	if a.cfg.DatabaseURL != "" {
		db = "postgres"
	}
	egress := "direct"
	if u := a.cfg.Egress.ProxyFor(a.cfg.UpstreamBaseURL); u != nil {
		egress = u.Redacted()
	}
	a.logger.Info("proxy configured", "listen", a.cfg.ListenAddr, "upstream", a.cfg.UpstreamBaseURL.Redacted(), "egress", egress,
		"database", db, "client_keys", len(a.cfg.ClientKeys), "cors_origins", len(a.cfg.CORSAllowedOrigins))
	if a.cfg.OpenProxy() {
		a.logger.Warn("OPEN PROXY: ALLOW_OPEN_PROXY=true and no PROXY_API_KEYS — anyone who can reach this port spends your OpenAI key")
	}
	if a.cfg.AdminPassword == "" {
		a.logger.Info("dashboard disabled: set ADMIN_PASSWORD to enable it at /dashboard")
	}
}

// Serve answers on ln until ctx is cancelled, then shuts down gracefully.
func (a *App) Serve(ctx context.Context, ln net.Listener) error {
	a.logger.Info("listening", "addr", ln.Addr().String())
	errc := make(chan error, 1)
	go func() { errc <- a.Fiber.Listener(ln) }()
	select {
	case err := <-errc:
		_ = a.Close(context.Background())
		return err
	case <-ctx.Done():
	}
	return a.Shutdown()
}

// Shutdown stops accepting, lets in-flight requests and streams finish
// within SHUTDOWN_GRACE, flushes the request log and closes the database.
func (a *App) Shutdown() error {
	a.logger.Info("shutting down", "grace", a.cfg.ShutdownGrace.String())
	ctx, cancel := context.WithTimeout(context.Background(), a.cfg.ShutdownGrace)
	defer cancel()
	// WebSocket sessions live on hijacked connections, which fasthttp's
	// shutdown does not wait for: they get the same grace, then 1001.
	wsDone := make(chan struct{})
	go func() { a.WS.Shutdown(ctx); close(wsDone) }()
	err := a.Fiber.ShutdownWithContext(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		a.logger.Warn("grace period over with requests still running")
		err = nil
	}
	a.Proxy.Wait(ctx.Done())
	<-wsDone
	return errors.Join(err, a.Close(ctx))
}

// Close stops background jobs, flushes the log and closes the database.
func (a *App) Close(ctx context.Context) error {
	a.stopJobs()
	a.jobs.Wait()
	a.Gate.Close() // settlements still being written go before the database
	flushCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	return errors.Join(a.Logs.Close(flushCtx), a.Store.Close())
}
