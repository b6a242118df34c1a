package soak

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// TestMemoryBound: hostile but legal load on memory, against the proxy
// binary, with its RSS sampled all along: 40 concurrent keyed streams close
// to IDEMPOTENCY_MAX_BODY, 40 clients that stall on the replay of a large
// record, and 8 concurrent large JSON uploads. The peak RSS is reported;
// with BUFFER_MEMORY_LIMIT set, it must stay under that limit plus the
// process's own baseline.
func TestMemoryBound(t *testing.T) {
	requireSoak(t)
	ensurePGRunning(t)
	event := "data: " + strings.Repeat("x", 64<<10) + "\n\n"
	const events = 118 // ≈ 7.6 MiB per stream, under the 8 MiB cap
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		if r.URL.Path != "/chat/completions" || r.Header.Get("X-Upload") != "" {
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, `{"ok":true}`)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		for range events {
			if _, err := io.WriteString(w, event); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			time.Sleep(10 * time.Millisecond)
		}
		_, _ = io.WriteString(w, "data: [DONE]\n\n")
	}))
	t.Cleanup(up.Close)
	limit := os.Getenv("SOAK_BUFFER_LIMIT") // e.g. 256MiB; empty: the default
	extra := map[string]string{"LOG_LEVEL": "error"}
	if limit != "" {
		extra["BUFFER_MEMORY_LIMIT"] = limit
	}
	bin := buildProxy(t)
	var px *proxyProc
	phase := func(name string, f func()) {
		px = startProxy(t, bin, up.URL, testdb.PostgresURL(t), extra)
		base := px.sample(t)
		var peak atomic.Int64
		stop, sampled := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(sampled)
			for {
				select {
				case <-stop:
					return
				case <-time.After(100 * time.Millisecond):
				}
				if s := px.sample(t); s.RSS > peak.Load() {
					peak.Store(s.RSS)
				}
			}
		}()
		start := time.Now()
		f()
		close(stop)
		<-sampled
		after := px.afterGCs(t, px.sample(t), 2)
		t.Logf("%s: RSS %s at start, peak %s (%s); after 2 GCs: %s", name, mib(base.RSS), mib(peak.Load()), time.Since(start).Round(time.Millisecond), after)
		px.stop(t)
	}
	hc := &http.Client{Timeout: 2 * time.Minute}
	post := func(key, body string, hdr map[string]string) (int, int) {
		req, _ := http.NewRequest("POST", px.URL+"/v1/chat/completions", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+clientKey)
		req.Header.Set("Content-Type", "application/json")
		if key != "" {
			req.Header.Set("Idempotency-Key", key)
		}
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := hc.Do(req)
		if err != nil {
			return 0, 0
		}
		defer resp.Body.Close()
		n, _ := io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, int(n)
	}
	statuses := func() (func(int), func() string) {
		var mu sync.Mutex
		seen := map[int]int{}
		return func(s int) { mu.Lock(); seen[s]++; mu.Unlock() }, func() string { mu.Lock(); defer mu.Unlock(); return fmt.Sprint(seen) }
	}

	phase("40 keyed streams near the capture cap", func() {
		add, show := statuses()
		var wg sync.WaitGroup
		for i := range 40 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s, _ := post(fmt.Sprintf("mem-stream-%d", i), `{"model":"m","stream":true}`, nil)
				add(s)
			}()
		}
		wg.Wait()
		t.Logf("statuses %s", show())
	})

	phase("40 stalled replays of a 7.6 MiB record", func() {
		if s, n := post("mem-replayed", `{"model":"m","stream":true}`, nil); s != 200 || n < 7<<20 {
			t.Fatalf("the record to replay: %d, %d bytes", s, n)
		}
		var conns []net.Conn
		for range 40 {
			conns = append(conns, apptest.StalledClient(t, px.URL, clientKey, "mem-replayed", `{"model":"m","stream":true}`, ""))
		}
		time.Sleep(3 * time.Second) // the stall itself
		for _, c := range conns {
			c.Close()
		}
	})

	phase("8 concurrent 30 MB JSON uploads", func() {
		add, show := statuses()
		big := `{"model":"m","messages":[{"role":"user","content":"` + strings.Repeat("y", 30<<20) + `"}]}`
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() { defer wg.Done(); s, _ := post("", big, map[string]string{"X-Upload": "1"}); add(s) }()
		}
		wg.Wait()
		t.Logf("statuses %s", show())
	})
}
