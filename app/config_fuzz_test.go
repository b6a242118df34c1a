package app

import (
	"strings"
	"testing"
)

// FuzzConfig: any environment either loads into a valid configuration or
// fails with an error naming a variable, never panics, and never echoes a
// secret value.
func FuzzConfig(f *testing.F) {
	f.Add("sk-x", "pk-0123456789", "https://api.openai.com/v1", "30s", "8MiB", "")
	f.Add("", "a:b:c", "http://[::1", "-5m", "0", "*")
	f.Fuzz(func(t *testing.T, key, clients, base, timeout, size, origins string) {
		env := map[string]string{"OPENAI_API_KEY": key, "PROXY_API_KEYS": clients, "UPSTREAM_BASE_URL": base,
			"UPSTREAM_TIMEOUT": timeout, "IDEMPOTENCY_MAX_BODY": size, "CORS_ALLOWED_ORIGINS": origins}
		cfg, err := LoadConfig(func(k string) string { return env[k] })
		if err != nil {
			if !strings.Contains(err.Error(), "_") {
				t.Fatalf("error names no variable: %v", err)
			}
			if k := strings.TrimSpace(key); len(k) >= 8 && strings.Contains(err.Error(), k) {
				t.Fatalf("error shows the upstream key: %v", err)
			}
			return
		}
		if cfg.UpstreamBaseURL == nil || cfg.UpstreamTimeout <= 0 || cfg.IdempotencyMaxBody <= 0 || (len(cfg.ClientKeys) == 0 && !cfg.AllowOpenProxy) {
			t.Fatalf("invalid configuration accepted: %+v", cfg)
		}
	})
}
