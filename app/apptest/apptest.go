// Package apptest starts the whole proxy in-process on a real port, for
// tests that talk to it over HTTP like a user would.
package apptest

import (
	"bytes"
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app"
)

// Test keys. They are long and recognisable so leak checks can grep for them.
const (
	UpstreamKey = "sk-upstream-SECRET-0123456789abcdef"
	ClientKey   = "pk-client-alpha-0123456789"
	ClientKey2  = "pk-client-beta-9876543210"
)

// Instance is a running proxy.
type Instance struct {
	URL    string // http://127.0.0.1:port
	App    *app.App
	Config app.Config
	Logs   *SyncBuffer // everything the proxy logged
	stop   context.CancelFunc
	done   chan error
	once   sync.Once
}

// Env builds a getenv from a map, for LoadConfig.
func Env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

// Start runs a proxy in front of upstreamURL. env overrides the defaults
// (client keys alpha and beta, SQLite in a temp dir, debug logging).
func Start(t testing.TB, upstreamURL string, env map[string]string) *Instance {
	t.Helper()
	return StartConfig(t, Config(t, upstreamURL, env))
}

// Config builds the configuration Start uses.
func Config(t testing.TB, upstreamURL string, env map[string]string) app.Config {
	t.Helper()
	vars := map[string]string{
		"OPENAI_API_KEY":    UpstreamKey,
		"UPSTREAM_BASE_URL": upstreamURL,
		"PROXY_API_KEYS":    "alpha:" + ClientKey + ",beta:" + ClientKey2,
		"DATA_DIR":          t.TempDir(),
		"LOG_LEVEL":         "debug",
		"SHUTDOWN_GRACE":    "5s",
	}
	for k, v := range env {
		vars[k] = v
	}
	cfg, err := app.LoadConfig(Env(vars))
	if err != nil {
		t.Fatalf("apptest: config: %v", err)
	}
	return cfg
}

// StartConfig runs a proxy with a ready configuration.
func StartConfig(t testing.TB, cfg app.Config) *Instance {
	t.Helper()
	return StartWith(t, cfg, nil)
}

// StartWith runs a proxy, letting hook change the app (add test routes)
// before it starts serving.
func StartWith(t testing.TB, cfg app.Config, hook func(*app.App)) *Instance {
	t.Helper()
	logs := &SyncBuffer{}
	logger := app.NewLogger(cfg, logs)
	ctx, cancel := context.WithCancel(context.Background())
	a, err := app.New(ctx, cfg, logger)
	if err != nil {
		cancel()
		t.Fatalf("apptest: start: %v", err)
	}
	if hook != nil {
		hook(a)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		cancel()
		t.Fatalf("apptest: listen: %v", err)
	}
	in := &Instance{URL: "http://" + ln.Addr().String(), App: a, Config: cfg, Logs: logs, stop: cancel, done: make(chan error, 1)}
	go func() { in.done <- a.Serve(ctx, ln) }()
	t.Cleanup(func() { in.Stop(t) })
	return in
}

// Stop shuts the proxy down gracefully and waits for it.
func (in *Instance) Stop(t testing.TB) {
	in.once.Do(func() {
		in.stop()
		select {
		case err := <-in.done:
			if err != nil {
				t.Errorf("apptest: shutdown: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("apptest: shutdown did not finish")
		}
	})
}

// Kill stops serving at once, as a crash would: no graceful shutdown, no
// lease release, no flush. The database handle is closed so the instance
// can no longer renew leases.
func (in *Instance) Kill(t testing.TB) {
	in.once.Do(func() {
		_ = in.App.Fiber.ShutdownWithTimeout(0)
		_ = in.App.Store.Close()
		in.stop()
	})
}

// SyncBuffer is a bytes.Buffer safe for concurrent writers.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns everything written so far.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
