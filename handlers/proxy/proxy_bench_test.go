package proxy_test

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/handlers/proxy"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// Run: go test -run '^$' -bench . -benchtime 5000x ./handlers/proxy/
//
// Each benchmark sends one small chat completion request per iteration over
// keep-alive connections, so the difference between Direct and Proxied is
// the cost the proxy adds.

const benchAnswer = `{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}`

func benchUpstream(b *testing.B) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Request-Id", "req_1")
		_, _ = io.WriteString(w, benchAnswer)
	}))
	b.Cleanup(srv.Close)
	return srv
}

func benchLoop(b *testing.B, target string, header func(i int) http.Header) {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	var n atomic.Int64
	latencies := make([]time.Duration, 0, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		req, _ := http.NewRequest("POST", target, strings.NewReader(chatBody))
		req.Header = header(int(n.Add(1)))
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		latencies = append(latencies, time.Since(start))
		if resp.StatusCode != 200 {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
	b.StopTimer()
	slices.Sort(latencies)
	b.ReportMetric(float64(latencies[len(latencies)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(latencies[len(latencies)*99/100].Microseconds()), "p99-µs")
}

func plainHeader(int) http.Header {
	return http.Header{"Authorization": {"Bearer " + apptest.ClientKey}, "Content-Type": {"application/json"}}
}

func BenchmarkDirect(b *testing.B) {
	up := benchUpstream(b)
	benchLoop(b, up.URL+"/chat/completions", plainHeader)
}

func BenchmarkProxied(b *testing.B) {
	up := benchUpstream(b)
	px := apptest.Start(b, up.URL, map[string]string{"LOG_LEVEL": "info"})
	benchLoop(b, px.URL+"/v1/chat/completions", plainHeader)
}

// BenchmarkProxiedNoLog runs the same proxy handler with no request log,
// to show what logging adds.
func BenchmarkProxiedNoLog(b *testing.B) {
	up := benchUpstream(b)
	base, _ := url.Parse(up.URL)
	p := proxy.NewProxy(proxy.ProxyConfig{
		UpstreamBaseURL: base, UpstreamAPIKey: apptest.UpstreamKey,
		ClientKeys:  []handlers.ClientKey{{Name: "alpha", Key: apptest.ClientKey}},
		MaxBodySize: 1 << 30, UpstreamTimeout: time.Minute, FirstByteTimeout: time.Minute, IdleTimeout: time.Minute,
	}, nil, nil, nil, slog.New(slog.DiscardHandler))
	f := fiber.New(fiber.Config{DisableStartupMessage: true, StreamRequestBody: true, DisablePreParseMultipartForm: true})
	f.All("/v1/*", p.Handle)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	go func() { _ = f.Listener(ln) }()
	b.Cleanup(func() { _ = f.Shutdown() })
	benchLoop(b, "http://"+ln.Addr().String()+"/v1/chat/completions", plainHeader)
}

func keyedHeader(prefix string) func(int) http.Header {
	return func(i int) http.Header {
		h := plainHeader(i)
		h.Set("Idempotency-Key", fmt.Sprintf("%s-%d-%d", prefix, time.Now().UnixNano(), i))
		return h
	}
}

func BenchmarkProxiedKeyedSQLite(b *testing.B) {
	up := benchUpstream(b)
	px := apptest.Start(b, up.URL, map[string]string{"LOG_LEVEL": "info"})
	benchLoop(b, px.URL+"/v1/chat/completions", keyedHeader("sqlite"))
}

func BenchmarkProxiedKeyedPostgres(b *testing.B) {
	up := benchUpstream(b)
	px := apptest.Start(b, up.URL, map[string]string{"LOG_LEVEL": "info", "DATABASE_URL": testdb.PostgresURL(b)})
	benchLoop(b, px.URL+"/v1/chat/completions", keyedHeader("pg"))
}

// BenchmarkProxiedKeyedPostgresParallel measures claim/complete throughput
// with 64 concurrent clients on unique keys.
func BenchmarkProxiedKeyedPostgresParallel(b *testing.B) {
	up := benchUpstream(b)
	px := apptest.Start(b, up.URL, map[string]string{"LOG_LEVEL": "info", "DATABASE_URL": testdb.PostgresURL(b)})
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 128}}
	var n atomic.Int64
	b.SetParallelism(32) // 2 cores x 32 = 64 concurrent clients
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			req, _ := http.NewRequest("POST", px.URL+"/v1/chat/completions", strings.NewReader(chatBody))
			req.Header = keyedHeader("par")(int(n.Add(1)))
			resp, err := client.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Errorf("status %d", resp.StatusCode)
				return
			}
		}
	})
}

// BenchmarkProxiedPostgres is BenchmarkProxied with the request log in
// PostgreSQL, where the log writer's inserts run outside this process.
func BenchmarkProxiedPostgres(b *testing.B) {
	up := benchUpstream(b)
	px := apptest.Start(b, up.URL, map[string]string{"LOG_LEVEL": "info", "DATABASE_URL": testdb.PostgresURL(b)})
	benchLoop(b, px.URL+"/v1/chat/completions", plainHeader)
}
