package proxy_test

import (
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// bufferBytes reads proxy_buffer_bytes from /metrics.
func bufferBytes(t *testing.T, px *apptest.Instance) int64 {
	t.Helper()
	resp, body := do(t, "GET", px.URL+"/metrics", "", nil, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("metrics: %d", resp.StatusCode)
	}
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, "proxy_buffer_bytes "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return int64(f)
		}
	}
	t.Fatal("no proxy_buffer_bytes in /metrics")
	return 0
}

// BUFFER_MEMORY_LIMIT holds under concurrent keyed streams that together
// want more than it, and stalled replays of a large record: every client
// gets its whole answer, what the proxy holds never exceeds the limit, and
// it is all given back afterwards.
func TestBufferMemoryLimit(t *testing.T) {
	const limit = 12 << 20
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"BUFFER_MEMORY_LIMIT": "12MiB", "IDEMPOTENCY_MAX_BODY": "8MiB"})
	var peak int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			peak = max(peak, bufferBytes(t, px))
		}
	}()
	// Six streams of about 3 MiB (48 events of 64 KiB), 18 MiB in all.
	steer := "test_events=48&test_pad_kib=64&test_interval_ms=5"
	url := px.URL + "/v1/chat/completions?" + steer
	var wg sync.WaitGroup
	results := make([]result, 6)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = keyed(t, url, apptest.ClientKey, fmt.Sprintf("budget-%d", i), streamBody, nil)
		}()
	}
	wg.Wait()
	for i, r := range results {
		if r.status != 200 || !strings.Contains(string(r.body), "[DONE]") || len(r.body) < 3<<20 {
			t.Errorf("stream %d: %d, %d bytes", i, r.status, len(r.body))
		}
	}
	// Ten clients stall on the replay of a 3 MiB record.
	stored := keyed(t, url, apptest.ClientKey, "budget-replayed", streamBody, nil)
	var first result
	apptest.Eventually(t, 10*time.Second, func() bool {
		first = keyed(t, url, apptest.ClientKey, "budget-replayed", streamBody, nil)
		return first.status != http.StatusConflict
	}, "the record stayed in progress")
	if first.status != 200 || !first.replayed || first.sha() != stored.sha() {
		t.Fatalf("the replay: %d, replayed %v, same bytes %v", first.status, first.replayed, first.sha() == stored.sha())
	}
	var conns []net.Conn
	for range 10 {
		conns = append(conns, apptest.StalledClient(t, px.URL, apptest.ClientKey, "budget-replayed", streamBody, steer))
	}
	held := bufferBytes(t, px)
	t.Logf("10 stalled replays of a %d KiB record hold %d KiB", len(stored.body)>>10, held>>10)
	if held > 10*(256<<10) {
		t.Errorf("10 stalled replays hold %d bytes, more than a piece each", held)
	}
	for _, c := range conns {
		c.Close()
	}
	close(stop)
	<-sampled
	t.Logf("peak held %d KiB of %d KiB", peak>>10, limit>>10)
	if peak > limit {
		t.Errorf("held %d bytes, over BUFFER_MEMORY_LIMIT %d", peak, limit)
	}
	apptest.Eventually(t, 10*time.Second, func() bool { return bufferBytes(t, px) == 0 }, "buffers not given back")
}

// A proxy whose buffers are all held refuses new keyed requests with a
// clear 503 (after a short wait), before anything runs upstream.
func TestKeyedRequestsWaitThenGet503AtTheMemoryLimit(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"BUFFER_MEMORY_LIMIT": "256KiB", "IDEMPOTENCY_MAX_BODY": "256KiB"})
	held := make(chan result, 1)
	go func() {
		held <- keyed(t, px.URL+"/v1/chat/completions?test_block=1", apptest.ClientKey, "holds-the-budget", chatBody, nil)
	}()
	waitForCalls(t, up, 1)
	r := keyed(t, px.URL+"/v1/chat/completions", apptest.ClientKey, "finds-no-memory", chatBody, nil)
	if r.status != http.StatusServiceUnavailable || !strings.Contains(string(r.body), "proxy_overloaded") || r.header.Get("Retry-After") == "" {
		t.Errorf("at the memory limit: %d %s (Retry-After %q)", r.status, r.body, r.header.Get("Retry-After"))
	}
	if n := up.Calls(); n != 1 {
		t.Errorf("upstream calls %d: the refused request ran", n)
	}
	up.Release()
	if r := <-held; r.status != 200 {
		t.Errorf("the request holding the memory: %d", r.status)
	}
	if r := keyed(t, px.URL+"/v1/chat/completions", apptest.ClientKey, "finds-memory-again", chatBody, nil); r.status != 200 {
		t.Errorf("after the memory was given back: %d %s", r.status, r.body)
	}
}
