package app_test

import (
	"strings"
	"testing"

	"github.com/openai-idempotent-proxy/proxy/app"
)

// TestConfigEgressProxy: HTTPS_PROXY, HTTP_PROXY and NO_PROXY are read in
// upper case, else lower case (as curl and Go read them), and a proxy the
// dialer cannot speak to is refused at start without showing its value.
func TestConfigEgressProxy(t *testing.T) {
	base := []string{"OPENAI_API_KEY", testUpstreamKey, "PROXY_API_KEYS", testClientKey}
	load := func(kv ...string) (app.Config, error) { return app.LoadConfig(env(append(base, kv...)...)) }

	cfg, err := load("https_proxy", "http://lower:3128", "HTTP_PROXY", "proxy.internal:3128", "no_proxy", "internal.example,10.0.0.0/8")
	if err != nil {
		t.Fatal(err)
	}
	if p := cfg.Egress.Proxy; p.HTTPSProxy != "http://lower:3128" || p.HTTPProxy != "proxy.internal:3128" || p.NoProxy != "internal.example,10.0.0.0/8" {
		t.Fatalf("lower-case forms not read: %+v", p)
	}
	cfg, err = load("HTTPS_PROXY", "http://upper:3128", "https_proxy", "http://lower:3128")
	if err != nil || cfg.Egress.Proxy.HTTPSProxy != "http://upper:3128" {
		t.Fatalf("upper case must win: %+v, %v", cfg.Egress.Proxy, err)
	}
	cfg, err = load()
	if err != nil || cfg.Egress.ProxyFor(cfg.UpstreamBaseURL) != nil {
		t.Fatalf("no proxy by default: %+v, %v", cfg.Egress.Proxy, err)
	}
	if cfg.WSMaxMessageSize != 16<<20 || cfg.WSIdleTimeout.String() != "5m0s" {
		t.Fatalf("websocket defaults: %d, %s", cfg.WSMaxMessageSize, cfg.WSIdleTimeout)
	}

	_, err = load("HTTPS_PROXY", "https://user:hunter2-secret@proxy:443")
	if err == nil || !strings.Contains(err.Error(), "HTTPS_PROXY") || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("an https:// proxy must be refused by name, without its credentials: %v", err)
	}
}
