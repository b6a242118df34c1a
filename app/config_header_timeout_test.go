package app_test

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// openFDs and rssKB describe this process (proxy and clients together).
func openFDs(t *testing.T) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	return len(entries)
}

func rssKB() int {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return n
		}
	}
	return 0
}

// TestHalfSentRequestsAreDropped: connections that never finish their
// headers are closed after REQUEST_HEADER_TIMEOUT, not after the body's
// REQUEST_READ_TIMEOUT, on new and on kept-alive connections; a slow body
// still gets the longer bound.
func TestHalfSentRequestsAreDropped(t *testing.T) {
	const conns = 1000
	const headerTimeout = time.Second
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"REQUEST_HEADER_TIMEOUT": headerTimeout.String(), "REQUEST_READ_TIMEOUT": "10m", "LOG_LEVEL": "info"})
	addr := strings.TrimPrefix(px.URL, "http://")
	half := "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer " + apptest.ClientKey + "\r\nContent-Type: application/json\r\n"

	fdsBefore, rssBefore := openFDs(t), rssKB()
	var dropped atomic.Int64
	var wg sync.WaitGroup
	var longest atomic.Int64
	start := time.Now()
	for i := range conns {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		if _, err := io.WriteString(c, half); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			_, _ = io.Copy(io.Discard, c) // returns when the proxy closes it
			if d := int64(time.Since(start)); d > longest.Load() {
				longest.Store(d)
			}
			dropped.Add(1)
		}()
	}
	fdsPeak, rssPeak := openFDs(t), rssKB()
	apptest.Eventually(t, headerTimeout+10*time.Second, func() bool { return dropped.Load() == conns },
		"%d of %d half-sent connections dropped", dropped.Load(), conns)
	wg.Wait()
	t.Logf("%d half-sent connections: fds %d before, %d with them open, %d after; RSS %d kB before, %d kB with them, %d kB after; last dropped %s after the first dial",
		conns, fdsBefore, fdsPeak, openFDs(t), rssBefore, rssPeak, rssKB(), time.Duration(longest.Load()).Round(10*time.Millisecond))

	t.Run("kept-alive connection", func(t *testing.T) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		br := bufio.NewReader(c)
		if _, err := io.WriteString(c, "GET /v1/models HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer "+apptest.ClientKey+"\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("first request: %v %v", resp, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		// The second request starts but never finishes its headers.
		sent := time.Now()
		if _, err := io.WriteString(c, half); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { _, _ = io.Copy(io.Discard, br); close(done) }()
		select {
		case <-done:
			t.Logf("kept-alive half-sent request dropped after %s", time.Since(sent).Round(10*time.Millisecond))
		case <-time.After(headerTimeout + 10*time.Second):
			t.Fatal("a kept-alive connection with half-sent headers was not dropped")
		}
	})

	t.Run("slow body keeps the read timeout", func(t *testing.T) {
		body := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := io.WriteString(c, half+"Content-Length: "+strconv.Itoa(len(body))+"\r\n\r\n"+body[:10]); err != nil {
			t.Fatal(err)
		}
		// A pause longer than the header timeout, mid-body: an upload in
		// progress, which REQUEST_READ_TIMEOUT (10m) governs.
		time.Sleep(2 * headerTimeout)
		if _, err := io.WriteString(c, body[10:]); err != nil {
			t.Fatalf("the proxy closed a connection mid-body after the header timeout: %v", err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("slow body: %v %v", resp, err)
		}
		resp.Body.Close()
	})
}
