package handlers_test

import (
	"strings"
	"testing"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

func TestMetrics(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"METRICS_TOKEN": "metrics-token-123"})
	do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody), map[string]string{"Content-Type": "application/json", "Idempotency-Key": "m-1"})
	do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody), map[string]string{"Content-Type": "application/json", "Idempotency-Key": "m-1"})
	do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(streamBody), map[string]string{"Content-Type": "application/json", "X-Test-Status": "503", "Idempotency-Key": "m-2"})
	do(t, "GET", px.URL+"/v1/files/file-abc123", apptest.ClientKey, nil, nil)
	do(t, "GET", px.URL+"/v1/models", "pk-wrong-00000000", nil, nil)

	resp, _ := do(t, "GET", px.URL+"/metrics", "", nil, nil)
	if resp.StatusCode != 401 {
		t.Fatalf("/metrics without the token: %d", resp.StatusCode)
	}
	resp, body := do(t, "GET", px.URL+"/metrics", "metrics-token-123", nil, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("/metrics: %d", resp.StatusCode)
	}
	text := string(body)
	for _, want := range []string{
		`proxy_requests_total{client="alpha",model="gpt-4o-mini",outcome="proxied",route="/v1/chat/completions",status_class="2xx"} 1`,
		`proxy_requests_total{client="alpha",model="gpt-4o-mini",outcome="replayed",route="/v1/chat/completions",status_class="2xx"} 1`,
		`proxy_requests_total{client="alpha",model="none",outcome="proxied",route="/v1/files/:id",status_class="2xx"} 1`,
		`outcome="unauthorized"`,
		`proxy_idempotency_total{result="executed"} 2`,
		`proxy_idempotency_total{result="replayed"} 1`,
		`proxy_idempotency_released_total{reason="upstream_status_503"} 1`,
		`proxy_tokens_total{kind="prompt"} 11`,
		"proxy_request_duration_seconds_bucket", "proxy_time_to_first_byte_seconds_bucket",
		"proxy_inflight_streams 0", "proxy_log_queue_depth", "proxy_log_dropped_total 0",
		"go_sql_open_connections", "go_goroutines", "process_resident_memory_bytes",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if t.Failed() {
		for _, l := range strings.Split(text, "\n") {
			if strings.HasPrefix(l, "proxy_requests_total") {
				t.Log(l)
			}
		}
	}
	assertNoSecrets(t, "/metrics", text)
}
