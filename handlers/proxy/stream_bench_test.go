package proxy_test

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// Run: go test -run '^$' -bench Stream -benchtime 3000x ./handlers/proxy/
//
// One streamed chat completion of 20 chunks per iteration, each chunk
// flushed by the upstream as a real server does, so that the proxy reads
// and writes it on its own: DirectStream is the upstream alone.

func streamUpstream(b *testing.B) *httptest.Server {
	chunks := make([]string, 20)
	for i := range chunks {
		chunks[i] = fmt.Sprintf("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\","+
			"\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok%d \"},\"finish_reason\":null}]}\n\n", i)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		f := w.(http.Flusher)
		for _, c := range chunks {
			_, _ = io.WriteString(w, c)
			f.Flush()
		}
		_, _ = io.WriteString(w, `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":20,"total_tokens":31}}`+"\n\ndata: [DONE]\n\n")
	}))
	b.Cleanup(srv.Close)
	return srv
}

const streamBenchBody = `{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello"}]}`

// streamLoop runs one stream per iteration and reports the time to the first
// event (request sent → first body byte read), p50 and p99.
func streamLoop(b *testing.B, target string) {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	var firstEvent []time.Duration
	buf := make([]byte, 64<<10)
	b.ReportAllocs()
	for b.Loop() {
		req, _ := http.NewRequest("POST", target, strings.NewReader(streamBenchBody))
		req.Header = plainHeader(0)
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		n, _ := io.ReadAtLeast(resp.Body, buf, 1)
		firstEvent = append(firstEvent, time.Since(start))
		rest, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body := string(buf[:n]) + string(rest)
		if resp.StatusCode != 200 || !strings.HasPrefix(body, "data: ") || !strings.HasSuffix(body, "data: [DONE]\n\n") {
			b.Fatalf("status %d, %d bytes", resp.StatusCode, len(body))
		}
	}
	slices.Sort(firstEvent)
	b.ReportMetric(float64(firstEvent[len(firstEvent)/2].Microseconds()), "first-event-p50-µs")
	b.ReportMetric(float64(firstEvent[len(firstEvent)*99/100].Microseconds()), "first-event-p99-µs")
}

func BenchmarkDirectStream(b *testing.B) {
	streamLoop(b, streamUpstream(b).URL+"/chat/completions")
}

func BenchmarkProxiedStream(b *testing.B) {
	px := apptest.Start(b, streamUpstream(b).URL, map[string]string{"LOG_LEVEL": "info"})
	streamLoop(b, px.URL+"/v1/chat/completions")
}
