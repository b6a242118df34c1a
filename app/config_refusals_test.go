package app_test

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app"
)

// valid is a configuration LoadConfig accepts; each case changes one thing.
func valid(kv ...string) func(string) string {
	return env(append([]string{"OPENAI_API_KEY", testUpstreamKey, "PROXY_API_KEYS", "app:" + testClientKey}, kv...)...)
}

// TestConfigRefusals: every refused value stops the start with an error
// naming its setting, and secrets are never shown in it.
func TestConfigRefusals(t *testing.T) {
	if _, err := app.LoadConfig(valid()); err != nil {
		t.Fatalf("the base configuration is refused: %v", err)
	}
	cases := []struct {
		name, setting, value, want string
	}{
		// Secrets too short to be secrets: redaction would mangle log lines.
		{"one-letter metrics token", "METRICS_TOKEN", "e", "at least 16 characters"},
		{"short metrics token", "METRICS_TOKEN", "fifteen-chars-x", "at least 16 characters"},
		{"short upstream key", "OPENAI_API_KEY", "sk-x", "at least 16 characters"},
		{"short client key", "PROXY_API_KEYS", "app:pk-123456789", "at least 16 characters"},
		{"short second client key", "PROXY_API_KEYS", "a:" + testClientKey + ",b:pk-short-key", "key 2"},
		{"short admin password", "ADMIN_PASSWORD", "elevenchars", "at least 12 characters"},
		// The README's placeholder, copied as-is.
		{"README placeholder", "OPENAI_API_KEY", "sk-...", "placeholder"},
		{"long placeholder", "OPENAI_API_KEY", "sk-proj-...-0123456789", "placeholder"},
		{"client key placeholder", "PROXY_API_KEYS", "dev:pk-dev-...-0123456789", "placeholder"},
		// Durations: none may be zero or negative.
		{"negative grace", "SHUTDOWN_GRACE", "-5s", "must be positive"},
		{"negative read timeout", "REQUEST_READ_TIMEOUT", "-1s", "must be positive"},
		{"zero header timeout", "REQUEST_HEADER_TIMEOUT", "0s", "must be positive"},
		{"zero days", "LOG_RETENTION", "0d", "must be positive"},
		// Listen addresses net.Listen would refuse later.
		{"port out of range", "LISTEN_ADDR", "127.0.0.1:99999", "1 to 65535"},
		{"port zero", "LISTEN_ADDR", ":0", "1 to 65535"},
		{"named port", "LISTEN_ADDR", ":http", "1 to 65535"},
		{"no port", "LISTEN_ADDR", "127.0.0.1", "host:port"},
		{"bad host", "LISTEN_ADDR", "no_such host:8080", "neither an IP address nor a host name"},
		// Pairs.
		{"first byte beyond the whole call", "UPSTREAM_FIRST_BYTE_TIMEOUT", "31m", "must not exceed UPSTREAM_TIMEOUT"},
		{"buffers smaller than one stored response", "BUFFER_MEMORY_LIMIT", "4MiB", "at least IDEMPOTENCY_MAX_BODY"},
	}
	for _, s := range app.Settings() {
		if strings.HasSuffix(s.Name, "_TIMEOUT") || strings.HasSuffix(s.Name, "_GRACE") || strings.HasSuffix(s.Name, "_TTL") ||
			strings.HasSuffix(s.Name, "_LEASE") || strings.HasSuffix(s.Name, "_RETENTION") {
			cases = append(cases, struct{ name, setting, value, want string }{"negative " + s.Name, s.Name, "-1s", "must be positive"})
		}
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := app.LoadConfig(valid(tc.setting, tc.value))
			if err == nil {
				t.Fatalf("%s=%q accepted", tc.setting, tc.value)
			}
			if msg := err.Error(); !strings.Contains(msg, tc.setting) || !strings.Contains(msg, tc.want) {
				t.Fatalf("error %q, want one naming %s and saying %q", msg, tc.setting, tc.want)
			}
			for _, secret := range []string{testUpstreamKey, testClientKey, "fifteen-chars-x", "elevenchars", "pk-short-key"} {
				if strings.Contains(err.Error(), secret) {
					t.Fatalf("error shows a secret: %v", err)
				}
			}
		})
	}
}

// TestConfigAcceptsTheDocumentedValues: the README's quick-start keys and
// ordinary listen addresses still load.
func TestConfigAcceptsTheDocumentedValues(t *testing.T) {
	for _, kv := range [][]string{
		{"PROXY_API_KEYS", "dev:pk-dev-0123456789", "ADMIN_PASSWORD", "change-me-please"},
		{"METRICS_TOKEN", "metrics-token-0123"},
		{"LISTEN_ADDR", "127.0.0.1:8080"},
		{"LISTEN_ADDR", "[::1]:8080"},
		{"LISTEN_ADDR", "[fe80::1%eth0]:8080"},
		{"LISTEN_ADDR", "localhost:65535"},
		{"UPSTREAM_TIMEOUT", "5m", "UPSTREAM_FIRST_BYTE_TIMEOUT", "5m"},
	} {
		if _, err := app.LoadConfig(valid(kv...)); err != nil {
			t.Errorf("%v refused: %v", kv, err)
		}
	}
	// A whole-call bound below the first-byte default shortens that default
	// instead of being refused.
	cfg, err := app.LoadConfig(valid("UPSTREAM_TIMEOUT", "2m"))
	if err != nil || cfg.FirstByteTimeout != 2*time.Minute {
		t.Errorf("UPSTREAM_TIMEOUT=2m alone: first-byte %v, error %v; want 2m, none", cfg.FirstByteTimeout, err)
	}
}

// stderrLines runs the proxy with env and returns its exit code and the
// lines it wrote to stderr.
func stderrLines(t *testing.T, getenv func(string) string) (int, []string) {
	t.Helper()
	var out, errOut strings.Builder
	code := app.Run(t.Context(), nil, getenv, &out, &errOut)
	return code, strings.Split(strings.TrimRight(errOut.String(), "\n"), "\n")
}

// TestFailedStartEndsWithItsCause: a start that fails prints its cause as
// the last line, with no noise from what was set up before it.
func TestFailedStartEndsWithItsCause(t *testing.T) {
	noise := []string{"context canceled", "SQL", "%v", "failed to initialize database", `("…")`}
	check := func(t *testing.T, lines []string, wantLast ...string) {
		t.Helper()
		last := lines[len(lines)-1]
		for _, w := range wantLast {
			if !strings.Contains(last, w) {
				t.Errorf("last line %q lacks %q", last, w)
			}
		}
		for _, l := range lines {
			for _, n := range noise {
				if strings.Contains(l, n) {
					t.Errorf("noise %q in %q", n, l)
				}
			}
		}
		if t.Failed() {
			t.Logf("stderr:\n%s", strings.Join(lines, "\n"))
		}
	}

	t.Run("address in use", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		code, lines := stderrLines(t, valid("LISTEN_ADDR", ln.Addr().String(), "DATA_DIR", t.TempDir()))
		if code != 1 {
			t.Errorf("exit %d, want 1", code)
		}
		check(t, lines, "listen failed", "address already in use")
		if len(lines) != 1 {
			t.Errorf("%d lines, want the cause alone", len(lines))
		}
	})

	t.Run("database unreachable", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close() // a port nothing listens on: connection refused
		free, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		listen := free.Addr().String()
		free.Close()
		code, lines := stderrLines(t, valid("LISTEN_ADDR", listen, "DATABASE_URL", "postgres://nobody@"+addr+"/x?sslmode=disable"))
		if code != 1 {
			t.Errorf("exit %d, want 1", code)
		}
		check(t, lines, "start failed", "connection refused")
		if len(lines) != 1 {
			t.Errorf("%d lines, want the cause alone", len(lines))
		}
	})

	t.Run("missing required variable", func(t *testing.T) {
		code, lines := stderrLines(t, env("PROXY_API_KEYS", "app:"+testClientKey))
		if code != 2 {
			t.Errorf("exit %d, want 2", code)
		}
		check(t, lines, "OPENAI_API_KEY: required, not set")
	})
}
