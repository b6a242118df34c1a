package app_test

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app"
	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// Keys long enough to be accepted, for tests that are about something else.
const (
	testUpstreamKey = "sk-test-0123456789abcdef"
	testClientKey   = "pk-0123456789abcdef"
)

func env(kv ...string) func(string) string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return apptest.Env(m)
}

func TestConfigDefaults(t *testing.T) {
	cfg, err := app.LoadConfig(env("OPENAI_API_KEY", testUpstreamKey, "PROXY_API_KEYS", "pk-0123456789abcdef,web:pk-abcdefghijklmnop"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ListenAddr != ":8080" || cfg.UpstreamBaseURL.String() != "https://api.openai.com/v1" || cfg.IdempotencyTTL != 24*time.Hour ||
		cfg.LogRetention != 30*24*time.Hour || cfg.MaxBodySize != 512<<20 || cfg.IdempotencyMaxBody != 8<<20 || cfg.AllowOpenProxy {
		t.Fatalf("defaults: %+v", cfg)
	}
	if len(cfg.ClientKeys) != 2 || cfg.ClientKeys[1].Name != "web" || !strings.HasPrefix(cfg.ClientKeys[0].Name, "key-") {
		t.Fatalf("client keys: %+v", cfg.ClientKeys)
	}
}

func TestConfigErrorsNameTheVariable(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  []string
		want string
	}{
		{"missing key", []string{"PROXY_API_KEYS", testClientKey}, "OPENAI_API_KEY"},
		{"no client keys", []string{"OPENAI_API_KEY", testUpstreamKey}, "PROXY_API_KEYS is required"},
		{"bad url", []string{"OPENAI_API_KEY", testUpstreamKey, "PROXY_API_KEYS", testClientKey, "UPSTREAM_BASE_URL", "ftp://x"}, "UPSTREAM_BASE_URL"},
		{"bad duration", []string{"OPENAI_API_KEY", testUpstreamKey, "PROXY_API_KEYS", testClientKey, "UPSTREAM_TIMEOUT", "soon"}, "UPSTREAM_TIMEOUT"},
		{"bad size", []string{"OPENAI_API_KEY", testUpstreamKey, "PROXY_API_KEYS", testClientKey, "MAX_BODY_SIZE", "lots"}, "MAX_BODY_SIZE"},
		{"short client key", []string{"OPENAI_API_KEY", testUpstreamKey, "PROXY_API_KEYS", "short"}, "PROXY_API_KEYS"},
		{"bad origin", []string{"OPENAI_API_KEY", testUpstreamKey, "PROXY_API_KEYS", testClientKey, "CORS_ALLOWED_ORIGINS", "example.com"}, "CORS_ALLOWED_ORIGINS"},
		{"bad bool", []string{"OPENAI_API_KEY", testUpstreamKey, "ALLOW_OPEN_PROXY", "yes please"}, "ALLOW_OPEN_PROXY"},
		{"upstream key as client key", []string{"OPENAI_API_KEY", "sk-same-0123456789", "PROXY_API_KEYS", "sk-same-0123456789"}, "must not contain OPENAI_API_KEY"},
		{"bad database url", []string{"OPENAI_API_KEY", testUpstreamKey, "PROXY_API_KEYS", testClientKey, "DATABASE_URL", "mysql://x"}, "DATABASE_URL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := app.LoadConfig(env(tc.env...))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one naming %s", err, tc.want)
			}
			if strings.Contains(err.Error(), testClientKey) || strings.Contains(err.Error(), "sk-same-0123456789") || strings.Contains(err.Error(), testUpstreamKey) {
				t.Fatalf("error shows a key: %v", err)
			}
		})
	}
	// Open proxy only when asked for explicitly.
	if _, err := app.LoadConfig(env("OPENAI_API_KEY", testUpstreamKey, "ALLOW_OPEN_PROXY", "true")); err != nil {
		t.Fatalf("open proxy: %v", err)
	}
}

// TestREADMEDocumentsEverySetting keeps the README's table true.
func TestREADMEDocumentsEverySetting(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range app.Settings() {
		row := "| `" + s.Name + "` |"
		if !strings.Contains(string(readme), row) {
			t.Errorf("README has no table row for %s", s.Name)
		}
	}
}

func TestRunRejectsBadConfigAndUnknownCommands(t *testing.T) {
	var out, errOut strings.Builder
	if code := app.Run(t.Context(), nil, env(), &out, &errOut); code != 2 || !strings.Contains(errOut.String(), "OPENAI_API_KEY") {
		t.Fatalf("bad config: exit %d, stderr %q", code, errOut.String())
	}
	errOut.Reset()
	if code := app.Run(t.Context(), []string{"frobnicate"}, env(), &out, &errOut); code != 2 {
		t.Fatalf("unknown command: exit %d", code)
	}
	if code := app.Run(t.Context(), []string{"help"}, env(), &out, &errOut); code != 0 || !strings.Contains(out.String(), "IDEMPOTENCY_TTL") {
		t.Fatalf("help: exit %d, %q", code, out.String())
	}
}
