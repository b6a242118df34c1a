package wsproxy_test

import (
	"io"
	"net/http"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fasthttp/websocket"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// TestManyConcurrentSessions opens 200 sessions at once, each exchanging a
// message while all are open, then closes them: every one works, the open
// gauge counts them, and goroutines return to their baseline. It reports
// the memory an open session costs, through the proxy and directly to the
// upstream (the difference is the proxy's share).
func TestManyConcurrentSessions(t *testing.T) {
	const n = 200
	in, up := start(t, nil)
	direct := "ws" + strings.TrimPrefix(up.URL, "http") + "/v1/realtime?model=m"
	proxied := wsURL(in, "/v1/realtime?model=m")

	// Warm both paths so pools and lazily started goroutines are in the baseline.
	for _, u := range []string{direct, proxied} {
		cs := openSessions(t, u, 1)
		closeSessions(t, cs)
	}
	apptest.Eventually(t, 10*time.Second, func() bool { return in.App.WS.Open() == 0 }, "warm-up session still open")
	baseline := settledGoroutines()

	perDirect := sessionMemory(t, direct, n, nil)
	perProxied := sessionMemory(t, proxied, n, func() {
		if open := in.App.WS.Open(); open != n {
			t.Errorf("%d sessions open, want %d", open, n)
		}
		if metric := scrapeMetric(t, in, "proxy_websocket_sessions"); metric != "200" {
			t.Errorf("proxy_websocket_sessions %q, want 200", metric)
		}
	})
	t.Logf("memory per open session (heap+stacks, all three parties in this process): direct %.1f KiB, through the proxy %.1f KiB, the proxy's share %.1f KiB",
		perDirect/1024, perProxied/1024, (perProxied-perDirect)/1024)

	apptest.Eventually(t, 10*time.Second, func() bool { return in.App.WS.Open() == 0 }, "sessions still open: %d", in.App.WS.Open())
	var left goroutineDump
	apptest.Eventually(t, 10*time.Second, func() bool { left = busyGoroutines(); return left.n <= baseline },
		"goroutines %v, baseline %d", &left, baseline)
}

// sessionMemory opens n sessions to url and returns the heap and stack
// growth per session while all are open.
func sessionMemory(t *testing.T, url string, n int, whileOpen func()) float64 {
	t.Helper()
	before := inUse()
	cs := openSessions(t, url, n)
	after := inUse()
	if whileOpen != nil {
		whileOpen()
	}
	closeSessions(t, cs)
	return float64(after-before) / float64(n)
}

func openSessions(t *testing.T, url string, n int) []*websocket.Conn {
	t.Helper()
	cs := make([]*websocket.Conn, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := websocket.Dialer{HandshakeTimeout: 20 * time.Second}
			c, _, err := d.Dial(url, http.Header{"Authorization": {"Bearer " + apptest.ClientKey}})
			if err != nil {
				errs <- err
				return
			}
			cs[i] = c
			_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
			if _, _, err := c.ReadMessage(); err != nil { // session.created
				errs <- err
				return
			}
			if err := c.WriteMessage(websocket.TextMessage, []byte(`{"type":"ping.test"}`)); err != nil {
				errs <- err
				return
			}
			if _, msg, err := c.ReadMessage(); err != nil || string(msg) != `{"type":"ping.test"}` {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("session: %v", err)
	}
	return cs
}

func closeSessions(t *testing.T, cs []*websocket.Conn) {
	t.Helper()
	for _, c := range cs {
		_ = c.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
	}
	for _, c := range cs {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		for {
			if _, _, err := c.ReadMessage(); err != nil {
				break
			}
		}
		_ = c.Close()
	}
}

func inUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse
}

// settledGoroutines is the count of busy goroutines (see busyGoroutines).
func settledGoroutines() int { return busyGoroutines().n }

// goroutineDump is a count of goroutines and their stacks, printed when a
// test fails.
type goroutineDump struct {
	n      int
	stacks string
}

func (d *goroutineDump) String() string { return strconv.Itoa(d.n) + ":\n" + d.stacks }

// busyGoroutines counts goroutines other than fasthttp's idle workers,
// which its pool keeps for reuse and reaps after 10 s (not per session).
func busyGoroutines() goroutineDump {
	buf := make([]byte, 4<<20)
	var d goroutineDump
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if lines := strings.SplitN(g, "\n", 3); len(lines) > 1 && strings.HasPrefix(lines[1], "github.com/valyala/fasthttp.(*workerPool).workerFunc") {
			continue
		}
		d.n++
		d.stacks += g + "\n\n"
	}
	return d
}

// TestFrameLatency reports the time a message takes to go to the upstream
// and back, directly and through the proxy (p50, p99), on one session.
// It asserts nothing about time: the machine is shared.
func TestFrameLatency(t *testing.T) {
	const rounds = 2000
	in, up := start(t, nil)
	measure := func(url string) (p50, p99 time.Duration) {
		cs := openSessions(t, url, 1)
		defer closeSessions(t, cs)
		c := cs[0]
		msg := []byte(`{"type":"input_audio_buffer.append","audio":"` + strings.Repeat("A", 1024) + `"}`)
		rtts := make([]time.Duration, rounds)
		for i := range rtts {
			began := time.Now()
			if err := c.WriteMessage(websocket.TextMessage, msg); err != nil {
				t.Fatal(err)
			}
			if _, _, err := c.ReadMessage(); err != nil {
				t.Fatal(err)
			}
			rtts[i] = time.Since(began)
		}
		slices.Sort(rtts)
		return rtts[rounds/2], rtts[rounds*99/100]
	}
	d50, d99 := measure("ws" + strings.TrimPrefix(up.URL, "http") + "/v1/realtime?model=m")
	p50, p99 := measure(wsURL(in, "/v1/realtime?model=m"))
	t.Logf("round trip of a 1 KiB text message (two frames, one each way), %d rounds: direct p50 %s p99 %s; through the proxy p50 %s p99 %s; added per frame ≈ p50 %s p99 %s",
		rounds, d50, d99, p50, p99, (p50-d50)/2, (p99-d99)/2)
}

// scrape returns /metrics.
func scrape(t *testing.T, in *apptest.Instance) string {
	t.Helper()
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}} // nothing left running
	resp, err := client.Get(in.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return string(body)
}

// scrapeMetric reads one unlabelled series from /metrics.
func scrapeMetric(t *testing.T, in *apptest.Instance, name string) string {
	t.Helper()
	for _, line := range strings.Split(scrape(t, in), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return v
		}
	}
	return ""
}
