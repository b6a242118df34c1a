package proxy_test

import (
	"context"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// waitWritten waits until the background writer has stored n records.
func waitWritten(t *testing.T, px *apptest.Instance, n uint64) {
	t.Helper()
	apptest.Eventually(t, 15*time.Second, func() bool { return px.App.Logs.Written() >= n },
		"request log: fewer than %d records written (dropped %d)", n, px.App.Logs.Dropped())
}

func logRows(t *testing.T, px *apptest.Instance) map[string]models.RequestLog {
	t.Helper()
	var rows []models.RequestLog
	if err := px.App.Store.DB().Order("id").Find(&rows).Error; err != nil {
		t.Fatal(err)
	}
	byKey := map[string]models.RequestLog{}
	for _, r := range rows {
		byKey[r.UserAgent] = r // each request below sends its own User-Agent
	}
	return byKey
}

func TestRequestLogRecordsUsageAndOutcomes(t *testing.T) {
	apptest.EachDB(t, nil, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		ua := func(name string) map[string]string {
			return map[string]string{"User-Agent": name, "Content-Type": "application/json"}
		}
		with := func(h map[string]string, k, v string) map[string]string { h[k] = v; return h }

		do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody), ua("json"))
		do(t, "POST", px.URL+"/v1/chat/completions?test_events=4", apptest.ClientKey, strings.NewReader(streamBody), ua("sse"))
		do(t, "POST", px.URL+"/v1/responses?test_events=6", apptest.ClientKey2, strings.NewReader(`{"model":"gpt-4.1","stream":true,"input":"x"}`), ua("responses"))
		do(t, "POST", px.URL+"/v1/embeddings", apptest.ClientKey, strings.NewReader(`{"model":"text-embedding-3-small","input":"x"}`), ua("embeddings"))
		do(t, "POST", px.URL+"/v1/chat/completions?test_gzip=1", apptest.ClientKey, strings.NewReader(chatBody), ua("gzip"))
		do(t, "POST", px.URL+"/v1/chat/completions", "pk-nobody-000000", strings.NewReader(chatBody), ua("unauthorized"))
		do(t, "POST", px.URL+"/v1/chat/completions?test_status=500", apptest.ClientKey, strings.NewReader(chatBody), ua("upstream500"))
		do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody), with(ua("keyed"), "Idempotency-Key", "log-1"))
		do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody), with(ua("replay"), "Idempotency-Key", "log-1"))
		do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(`{"model":"x"}`), with(ua("mismatch"), "Idempotency-Key", "log-1"))
		do(t, "POST", px.URL+"/v1/chat/completions?test_gzip=1", apptest.ClientKey, strings.NewReader(chatBody), with(ua("keyed-gzip"), "Idempotency-Key", "log-2"))
		const n = 11
		waitWritten(t, px, n)
		rows := logRows(t, px)

		for _, tc := range []struct {
			name                                  string
			status                                int
			outcome, client, model, path          string
			prompt, completion, total, cached, rs int64
			stream                                bool
		}{
			{"json", 200, "proxied", "alpha", "gpt-4o-mini", "/v1/chat/completions", 11, 7, 18, 3, 2, false},
			{"sse", 200, "proxied", "alpha", "gpt-4o-mini", "/v1/chat/completions", 5, 4, 9, 0, 0, true},
			{"responses", 200, "proxied", "beta", "gpt-4.1", "/v1/responses", 9, 6, 15, 4, 1, true},
			{"embeddings", 200, "proxied", "alpha", "text-embedding-3-small", "/v1/embeddings", 8, 0, 8, 0, 0, false},
			{"gzip", 200, "proxied", "alpha", "gpt-4o-mini", "/v1/chat/completions", 11, 7, 18, 3, 2, false}, // decoded by the proxy
			{"unauthorized", 401, "unauthorized", "", "", "/v1/chat/completions", 0, 0, 0, 0, 0, false},
			{"upstream500", 500, "proxied", "alpha", "gpt-4o-mini", "/v1/chat/completions", 0, 0, 0, 0, 0, false},
			{"keyed", 200, "proxied", "alpha", "gpt-4o-mini", "/v1/chat/completions", 11, 7, 18, 3, 2, false},
			{"replay", 200, "replayed", "alpha", "gpt-4o-mini", "/v1/chat/completions", 0, 0, 0, 0, 0, false},
			{"keyed-gzip", 200, "proxied", "alpha", "gpt-4o-mini", "/v1/chat/completions", 11, 7, 18, 3, 2, false}, // captured decoded
			{"mismatch", 422, "idempotency_mismatch", "alpha", "x", "/v1/chat/completions", 0, 0, 0, 0, 0, false},
		} {
			r, ok := rows[tc.name]
			if !ok {
				t.Fatalf("no log row for %s", tc.name)
			}
			if r.Status != tc.status || r.Outcome != tc.outcome || r.Client != tc.client || r.Model != tc.model || r.Path != tc.path || r.Stream != tc.stream {
				t.Errorf("%s: got status=%d outcome=%s client=%s model=%s path=%s stream=%v", tc.name, r.Status, r.Outcome, r.Client, r.Model, r.Path, r.Stream)
			}
			if r.PromptTokens != tc.prompt || r.CompletionTokens != tc.completion || r.TotalTokens != tc.total || r.CachedTokens != tc.cached || r.ReasoningTokens != tc.rs {
				t.Errorf("%s: usage %d/%d/%d cached %d reasoning %d", tc.name, r.PromptTokens, r.CompletionTokens, r.TotalTokens, r.CachedTokens, r.ReasoningTokens)
			}
			if r.DurationMs < 0 || r.CreatedAt.IsZero() || r.Method != "POST" {
				t.Errorf("%s: bad timing/method %+v", tc.name, r)
			}
		}
		if r := rows["json"]; r.UpstreamRequestID == "" || r.ResponseBytes == 0 || r.RequestBytes != int64(len(chatBody)) || r.ClientIP == "" {
			t.Errorf("json row lacks details: %+v", r)
		}
		if r := rows["keyed"]; r.IdempotencyKey != "log-1" {
			t.Errorf("keyed row key %q", r.IdempotencyKey)
		}
	})
}

func TestRequestLogOfUnreachableUpstreamAndConflict(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"IDEMPOTENCY_JOIN_WAIT": "0"}) // a 409, not a join
	done := make(chan struct{})
	go func() {
		defer close(done)
		do(t, "POST", px.URL+"/v1/chat/completions?test_block=1", apptest.ClientKey, strings.NewReader(chatBody), map[string]string{"User-Agent": "holder", "Idempotency-Key": "c-1", "Content-Type": "application/json"})
	}()
	waitForCalls(t, up, 1)
	// The same request (query included: part of the fingerprint) while it runs.
	do(t, "POST", px.URL+"/v1/chat/completions?test_block=1", apptest.ClientKey, strings.NewReader(chatBody), map[string]string{"User-Agent": "conflict", "Idempotency-Key": "c-1", "Content-Type": "application/json"})
	up.Release()
	<-done

	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	px2 := apptest.Start(t, "http://"+dead, nil)
	do(t, "GET", px2.URL+"/v1/models", apptest.ClientKey, nil, map[string]string{"User-Agent": "unreachable"})

	waitWritten(t, px, 2)
	waitWritten(t, px2, 1)
	if r := logRows(t, px)["conflict"]; r.Status != 409 || r.Outcome != models.OutcomeIdempotencyConflict {
		t.Fatalf("conflict row %+v", r)
	}
	if r := logRows(t, px2)["unreachable"]; r.Status != 502 || r.Outcome != models.OutcomeUpstreamError || r.Error == "" {
		t.Fatalf("unreachable row %+v", r)
	}
}

func TestRequestLogKeepsUpUnderLoad(t *testing.T) {
	up := benchUpstreamT(t)
	px := apptest.Start(t, up, map[string]string{"DATABASE_URL": testdb.PostgresURL(t), "LOG_LEVEL": "info"})
	const total, workers = 5000, 32
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: workers}}
	var wg sync.WaitGroup
	jobs := make(chan int)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				req, _ := http.NewRequest("POST", px.URL+"/v1/chat/completions", strings.NewReader(chatBody))
				req.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
				req.Header.Set("Content-Type", "application/json")
				resp, err := client.Do(req)
				if err != nil {
					t.Error(err)
					return
				}
				resp.Body.Close()
			}
		}()
	}
	for i := 0; i < total; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	waitWritten(t, px, total)
	var count int64
	px.App.Store.DB().Model(&models.RequestLog{}).Count(&count)
	if count != total || px.App.Logs.Dropped() != 0 {
		t.Fatalf("%d rows, %d dropped; want %d rows", count, px.App.Logs.Dropped(), total)
	}
}

func TestLoggingNeverBlocksWhenTheDatabaseIsDown(t *testing.T) {
	dbURL, fwd := testdb.ThroughForwarder(t, testdb.PostgresURL(t))
	up := benchUpstreamT(t)
	px := apptest.Start(t, up, map[string]string{"DATABASE_URL": dbURL, "LOG_QUEUE_SIZE": "100", "LOG_LEVEL": "error"})
	send := func(n int) {
		for i := 0; i < n; i++ {
			resp, _ := do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody), map[string]string{"Content-Type": "application/json"})
			if resp.StatusCode != 200 {
				t.Fatalf("request %d with the database down: %d", i, resp.StatusCode)
			}
		}
	}
	send(50) // warm up connections and goroutines
	runtime.GC()
	goroutines := runtime.NumGoroutine()
	fwd.Down()
	start := time.Now()
	send(1000)
	took := time.Since(start)
	if px.App.Logs.Dropped() == 0 {
		t.Fatal("no records dropped with the database down and a 100-record queue")
	}
	if g := runtime.NumGoroutine(); g > goroutines+20 {
		t.Fatalf("goroutines grew from %d to %d with the database down", goroutines, g)
	}
	t.Logf("1000 requests with the database down in %v; dropped %d", took, px.App.Logs.Dropped())
	fwd.Up()
}

func benchUpstreamT(t *testing.T) string {
	up := apptest.NewUpstream(t)
	return up.URL
}

func TestShutdownFlushesTheRequestLog(t *testing.T) {
	dbURL := testdb.PostgresURL(t)
	up := benchUpstreamT(t)
	px := apptest.Start(t, up, map[string]string{"DATABASE_URL": dbURL, "LOG_LEVEL": "info"})
	const n = 300
	for i := 0; i < n; i++ {
		do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody), map[string]string{"Content-Type": "application/json"})
	}
	px.Stop(t) // at once: most records are still queued
	s, err := models.Open(context.Background(), models.Options{DatabaseURL: dbURL})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var count int64
	s.DB().Model(&models.RequestLog{}).Count(&count)
	if count != n {
		t.Fatalf("%d rows after a clean stop, want %d", count, n)
	}
}
