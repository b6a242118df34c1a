package proxy_test

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

func TestMetrics(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"METRICS_TOKEN": "metrics-token-123"})
	do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody), map[string]string{"Content-Type": "application/json", "Idempotency-Key": "m-1"})
	do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody), map[string]string{"Content-Type": "application/json", "Idempotency-Key": "m-1"})
	do(t, "POST", px.URL+"/v1/chat/completions?test_status=503", apptest.ClientKey, strings.NewReader(streamBody), map[string]string{"Content-Type": "application/json", "Idempotency-Key": "m-2"})
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

// TestMetricLabelsAreBounded: clients choose models and paths freely, so
// invented ones must fold into "other" instead of adding series forever.
func TestMetricLabelsAreBounded(t *testing.T) {
	const invented = 3000
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"LOG_LEVEL": "info"})
	_, before := do(t, "GET", px.URL+"/metrics", "", nil, nil)

	var wg sync.WaitGroup
	work := make(chan int)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := &http.Client{}
			for i := range work {
				var req *http.Request
				switch i % 3 {
				case 0: // an invented model
					req, _ = http.NewRequest("POST", px.URL+"/v1/chat/completions",
						strings.NewReader(fmt.Sprintf(`{"model":"made-up-model-%d","messages":[]}`, i)))
					req.Header.Set("Content-Type", "application/json")
				case 1: // an invented route
					req, _ = http.NewRequest("GET", fmt.Sprintf("%s/v1/invented-%s/route", px.URL, letters(i)), nil)
				default: // a real route with a fresh id
					req, _ = http.NewRequest("GET", fmt.Sprintf("%s/v1/threads/thread_%d/runs/run_%d", px.URL, i, i), nil)
				}
				req.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
				resp, err := client.Do(req)
				if err != nil {
					t.Error(err)
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
	for i := range invented {
		work <- i
	}
	close(work)
	wg.Wait()

	_, body := do(t, "GET", px.URL+"/metrics", "", nil, nil)
	series, models, routes := 0, map[string]bool{}, map[string]bool{}
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, "proxy_") {
			series++
		}
		if strings.HasPrefix(l, "proxy_requests_total{") {
			models[labelValue(l, "model")] = true
			routes[labelValue(l, "route")] = true
		}
	}
	t.Logf("/metrics: %d bytes before, %d after %d invented requests; %d proxy_ series, %d model labels, %d route labels; RSS %s MB before, %s MB after",
		len(before), len(body), invented, series, len(models), len(routes), rssMB(before), rssMB(body))
	if len(models) > 110 || len(routes) > 5 || series > 400 {
		t.Errorf("labels not bounded: %d models, %d routes, %d series; routes %v", len(models), len(routes), series, routes)
	}
	for _, want := range []string{`route="/v1/threads/:id/runs/:id"`, `route="other"`, `model="other"`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// rssMB reads process_resident_memory_bytes from a /metrics page.
func rssMB(page []byte) string {
	for _, l := range strings.Split(string(page), "\n") {
		if v, ok := strings.CutPrefix(l, "process_resident_memory_bytes "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return strconv.FormatFloat(f/(1<<20), 'f', 1, 64)
		}
	}
	return "?"
}

// TestMetricsStartAtZero: series with known label values exist before
// their first event.
func TestMetricsStartAtZero(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	_, body := do(t, "GET", px.URL+"/metrics", "", nil, nil)
	for _, want := range []string{
		`proxy_idempotency_total{result="executed"} 0`, `proxy_idempotency_total{result="taken_over"} 0`,
		`proxy_idempotency_total{result="replayed"} 0`, `proxy_idempotency_total{result="conflict"} 0`,
		`proxy_idempotency_total{result="mismatch"} 0`, `proxy_idempotency_total{result="invalid"} 0`,
		`proxy_idempotency_total{result="gone"} 0`, `proxy_idempotency_total{result="unavailable"} 0`,
		`proxy_idempotency_released_total{reason="client_gone"} 0`, `proxy_idempotency_released_total{reason="upstream_timeout"} 0`,
		`proxy_upstream_errors_total{kind="unreachable"} 0`, `proxy_tokens_total{kind="prompt"} 0`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// letters spells n in a to z: a path segment without digits.
func letters(n int) string {
	b := []byte{}
	for ; n > 0 || len(b) == 0; n /= 26 {
		b = append(b, byte('a'+n%26))
	}
	return string(b)
}

// labelValue returns the value of label name in a Prometheus text line.
func labelValue(line, name string) string {
	_, rest, ok := strings.Cut(line, name+`="`)
	if !ok {
		return ""
	}
	v, _, _ := strings.Cut(rest, `"`)
	return v
}

// TestUpstreamKeyRejected: an upstream refusing OPENAI_API_KEY is said
// plainly in the log (once per interval), counted in /metrics, and exposed
// for the dashboard; a client's bad proxy key is not mistaken for it.
func TestUpstreamKeyRejected(t *testing.T) {
	var calls atomic.Int64
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusUnauthorized)
		code := "invalid_api_key"
		if r.URL.Path == "/audio/speech" {
			code = "" // a restricted key without this scope: OpenAI sends no code
		}
		fmt.Fprintf(w, `{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","param":null,"code":%q}}`, code)
	}))
	t.Cleanup(up.Close)
	px := apptest.Start(t, up.URL, map[string]string{"LOG_LEVEL": "info"})

	if at := px.App.Metrics.UpstreamKeyRejectedAt(); !at.IsZero() {
		t.Fatalf("rejected at %v before any request", at)
	}
	resp, _ := do(t, "GET", px.URL+"/v1/models", "pk-not-a-proxy-key-000", nil, nil)
	if resp.StatusCode != 401 || calls.Load() != 0 {
		t.Fatalf("bad proxy key: %d, %d upstream calls", resp.StatusCode, calls.Load())
	}
	if at := px.App.Metrics.UpstreamKeyRejectedAt(); !at.IsZero() {
		t.Fatal("a bad client key was taken for an upstream key rejection")
	}

	before := time.Now()
	for i := range 3 {
		do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody), map[string]string{"Content-Type": "application/json"})
		do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody),
			map[string]string{"Content-Type": "application/json", "Idempotency-Key": fmt.Sprintf("k-%d", i)})
	}
	do(t, "POST", px.URL+"/v1/audio/speech", apptest.ClientKey, strings.NewReader(`{"model":"tts-1","input":"hi"}`), map[string]string{"Content-Type": "application/json"})

	if at := px.App.Metrics.UpstreamKeyRejectedAt(); at.Before(before) {
		t.Fatalf("UpstreamKeyRejectedAt = %v, want after %v", at, before)
	}
	_, body := do(t, "GET", px.URL+"/metrics", "", nil, nil)
	for _, want := range []string{
		`proxy_upstream_auth_failures_total{code="invalid_api_key"} 6`,
		`proxy_upstream_auth_failures_total{code="other"} 1`,
		"proxy_upstream_key_rejected_timestamp_seconds 1.", // a Unix time, not 0
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	logs := px.Logs.String()
	if n := strings.Count(logs, "upstream rejects OPENAI_API_KEY"); n != 1 {
		t.Errorf("%d log lines about the rejected key after 6 rejections, want 1 (rate-limited):\n%s", n, logs)
	}
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, "upstream rejects OPENAI_API_KEY") && !strings.Contains(l, "level=ERROR") {
			t.Errorf("not logged as an error: %s", l)
		}
	}
	if !strings.Contains(logs, "upstream answered 401 to OPENAI_API_KEY") {
		t.Error("a 401 without invalid_api_key is not logged")
	}
	assertNoSecrets(t, "log", logs)
}

// On PostgreSQL the claims and completions of concurrent keyed requests
// share statements; /metrics tells how many each wrote, so operators see
// the average batch. SQLite does not batch and has no such series.
func TestIdempotencyBatchMetrics(t *testing.T) {
	apptest.EachDB(t, nil, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		const requests = 20
		var wg sync.WaitGroup
		for i := range requests {
			wg.Go(func() {
				resp, _ := do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody),
					map[string]string{"Content-Type": "application/json", "Idempotency-Key": fmt.Sprint("batch-", i)})
				if resp.StatusCode != 200 {
					t.Errorf("request %d: %d", i, resp.StatusCode)
				}
			})
		}
		wg.Wait()
		_, body := do(t, "GET", px.URL+"/metrics", "", nil, nil)
		values := map[string]float64{}
		for line := range strings.Lines(string(body)) {
			if name, v, ok := strings.Cut(strings.TrimSpace(line), " "); ok && strings.HasPrefix(name, "proxy_idempotency_batch_") {
				values[name], _ = strconv.ParseFloat(v, 64)
			}
		}
		if _, onPostgres := env["DATABASE_URL"]; !onPostgres {
			if len(values) != 0 {
				t.Errorf("SQLite batches nothing, yet /metrics has %v", values)
			}
			return
		}
		for _, kind := range []string{"claim", "completion"} {
			calls := values[`proxy_idempotency_batch_calls_total{kind="`+kind+`"}`]
			statements := values[`proxy_idempotency_batch_statements_total{kind="`+kind+`"}`]
			if calls != requests || statements < 1 || statements > calls {
				t.Errorf("%s: %v calls in %v statements, want %d calls in 1 to %d", kind, calls, statements, requests, requests)
			}
		}
	})
}
