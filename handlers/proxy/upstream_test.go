package proxy_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// Upstreams that close idle keep-alive connections after a second, each the
// way a real server does it.
var shortIdleUpstreams = map[string]func(*httptest.Server){
	// Go's net/http: a FIN after IdleTimeout, nothing announced.
	"go-idle-timeout": func(s *httptest.Server) { s.Config.IdleTimeout = time.Second },
	// Node's http server: announces Keep-Alive: timeout=N, closes after it.
	"node-keep-alive": func(s *httptest.Server) {
		s.Config.IdleTimeout = time.Second
		next := s.Config.Handler
		s.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Keep-Alive", "timeout=1")
			next.ServeHTTP(w, r)
		})
	},
	// A server that resets idle connections instead of closing them.
	"reset-on-idle": func(s *httptest.Server) {
		s.Config.IdleTimeout = time.Second
		s.Config.ConnState = func(c net.Conn, state http.ConnState) {
			if tc, ok := c.(*net.TCPConn); ok && state == http.StateIdle {
				_ = tc.SetLinger(0)
			}
		}
	},
}

// Every method, keyed or not, sent after an idle gap longer than the
// upstream's keep-alive timeout, succeeds and runs upstream exactly once.
func TestRequestsAfterUpstreamClosedIdleConnections(t *testing.T) {
	for name, configure := range shortIdleUpstreams {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			up := apptest.NewUpstreamWith(t, configure)
			px := apptest.Start(t, up.URL, nil)
			steps := []struct{ method, path, body, key string }{
				{"GET", "/v1/models", "", ""},
				{"POST", "/v1/chat/completions", `{"model":"gpt-4o-mini"}`, ""},
				{"PATCH", "/v1/fine_tuning/jobs/ft-1", `{"x":1}`, ""},
				{"DELETE", "/v1/files/file-1", "", ""},
				{"POST", "/v1/chat/completions", `{"model":"gpt-4o-mini"}`, "idle-gap-" + name},
				{"POST", "/v1/embeddings", `{"model":"e","input":"x"}`, ""},
			}
			for i, s := range steps {
				if i > 0 {
					time.Sleep(1500 * time.Millisecond) // the idle gap under test, longer than the upstream's 1 s
				}
				hdr := map[string]string{"Content-Type": "application/json"}
				if s.key != "" {
					hdr["Idempotency-Key"] = s.key
				}
				resp, body := do(t, s.method, px.URL+s.path+"?test_id="+fmt.Sprint(i), apptest.ClientKey, strings.NewReader(s.body), hdr)
				if resp.StatusCode != 200 {
					t.Fatalf("step %d %s %s after an idle gap: %d %s", i, s.method, s.path, resp.StatusCode, body)
				}
			}
			perID := map[string]int{}
			for _, r := range up.Requests() {
				perID[r.ID]++
			}
			for i := range steps {
				if n := perID[fmt.Sprint(i)]; n != 1 {
					t.Errorf("step %d executed upstream %d times, want exactly once", i, n)
				}
			}
		})
	}
}

// recordingUpstream is a bare HTTP/1.1 upstream that counts, by test_id, the
// requests it read whole (body included); test_drop=1 reads a request and
// hangs up without answering.
func recordingUpstream(t *testing.T) (url string, received func(id string) int) {
	var mu sync.Mutex
	counts := map[string]int{}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				br := bufio.NewReader(conn)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					if _, err := io.Copy(io.Discard, req.Body); err != nil {
						return // a broken body is not a request received
					}
					mu.Lock()
					counts[req.URL.Query().Get("test_id")]++
					mu.Unlock()
					if req.URL.Query().Get("test_drop") != "" {
						return // received, maybe acted on, never answered
					}
					_, _ = io.WriteString(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
				}
			}()
		}
	}()
	return "http://" + ln.Addr().String(), func(id string) int {
		mu.Lock()
		defer mu.Unlock()
		return counts[id]
	}
}

// An upstream that read the whole request and then dropped the connection
// may have acted on it: the proxy answers 502 and never sends it again.
func TestRequestTheUpstreamReceivedIsNotResent(t *testing.T) {
	upURL, received := recordingUpstream(t)
	px := apptest.Start(t, upURL, nil)
	hdr := map[string]string{"Content-Type": "application/json"}
	if resp, body := do(t, "POST", px.URL+"/v1/chat/completions?test_id=warm", apptest.ClientKey, strings.NewReader(`{}`), hdr); resp.StatusCode != 200 {
		t.Fatalf("warm-up: %d %s", resp.StatusCode, body)
	}
	for _, key := range []string{"", "dropped-keyed"} {
		hdr = map[string]string{"Content-Type": "application/json"}
		if key != "" {
			hdr["Idempotency-Key"] = key
		}
		resp, body := do(t, "POST", px.URL+"/v1/chat/completions?test_drop=1&test_id=drop"+key, apptest.ClientKey, strings.NewReader(`{}`), hdr)
		if resp.StatusCode != http.StatusBadGateway {
			t.Errorf("key %q: status %d %s, want 502", key, resp.StatusCode, body)
		}
		if n := received("drop" + key); n != 1 {
			t.Errorf("key %q: the upstream received the request %d times, want once", key, n)
		}
	}
}

// A chunked upload whose framing breaks mid-body, sent on a pooled (reused)
// connection, is the client's error: the upstream never receives a complete
// request — not the partial body, and not a resend of it without its body.
func TestBrokenUploadOnReusedConnectionIsNotResent(t *testing.T) {
	upURL, received := recordingUpstream(t)
	px := apptest.Start(t, upURL, nil)
	if resp, body := do(t, "GET", px.URL+"/v1/models?test_id=warm", apptest.ClientKey, nil, nil); resp.StatusCode != 200 {
		t.Fatalf("warm-up: %d %s", resp.StatusCode, body)
	}
	host := strings.TrimPrefix(px.URL, "http://")
	resp, body := sendRaw(t, px.URL, "POST /v1/files?test_id=broken HTTP/1.1\r\nHost: "+host+"\r\nAuthorization: Bearer "+apptest.ClientKey+
		"\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz-not-a-size\r\n", true)
	wantOpenAIError(t, resp, body, 400, "invalid_request_body")
	if n := received("broken"); n != 0 {
		t.Errorf("the upstream received %d complete requests for a broken upload, want none", n)
	}
}

// A client that gives up on a non-streamed call cancels it upstream, within
// about a second, and the log says so; a keyed one runs to its end and is
// replayed to the retry.
func TestAbandonedNonStreamCall(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)

	abandon := func(t *testing.T, id string) {
		req := chatRequest(t, px.URL+"/v1/chat/completions?test_block=1&test_id="+id, `{"model":"gpt-4o-mini"}`, nil)
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() {
			resp, err := http.DefaultClient.Do(req.WithContext(ctx))
			if err == nil {
				resp.Body.Close()
			}
			errc <- err
		}()
		apptest.Eventually(t, 5*time.Second, func() bool { return upstreamSaw(up, id) != nil }, "the call never reached the upstream")
		gaveUp := time.Now()
		cancel()
		<-errc
		seen := upstreamSaw(up, id)
		select {
		case <-seen.Ended:
		case <-time.After(10 * time.Second):
			t.Fatal("the upstream call was still running 10 s after its client left")
		}
		t.Logf("upstream saw the cancel %v after the client left", time.Since(gaveUp))
		if upstreamSaw(up, id).Cancelled != true {
			t.Error("the upstream call ended without being cancelled")
		}
		rec := lastLog(t, px, func(r models.RequestLog) bool {
			return r.Path == "/v1/chat/completions" && r.Outcome == models.OutcomeClientCancelled
		})
		if rec.Status != 499 {
			t.Errorf("logged status %d, want 499", rec.Status)
		}
	}
	t.Run("unkeyed is cancelled", func(t *testing.T) { abandon(t, "abandon") })

	// Watches are pooled (watch.go): calls answered after the watch began
	// and calls answered before it leave the connection serving, and the
	// next call a client abandons is still cancelled.
	t.Run("after watched and quick calls on one connection", func(t *testing.T) {
		client := &http.Client{Transport: &http.Transport{MaxConnsPerHost: 1}}
		defer client.CloseIdleConnections()
		reused := 0
		for i, delay := range []int{0, afterWatchBegan, 0, 0, afterWatchBegan, afterWatchBegan, 0} {
			req := chatRequest(t, fmt.Sprintf("%s/v1/chat/completions?test_delay_ms=%d&test_id=watched-%d", px.URL, delay, i), `{"model":"gpt-4o-mini"}`, nil)
			req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
				GotConn: func(info httptrace.GotConnInfo) {
					if info.Reused {
						reused++
					}
				},
			}))
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("call %d (answered after %d ms): %v", i, delay, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("call %d (answered after %d ms): %d %s", i, delay, resp.StatusCode, body)
			}
			if s := upstreamSaw(up, fmt.Sprint("watched-", i)); s == nil || s.Cancelled {
				t.Fatalf("call %d (answered after %d ms) was cancelled upstream", i, delay)
			}
		}
		if reused != 6 {
			t.Errorf("%d of 7 calls reused the connection, want 6", reused)
		}
		abandon(t, "abandon-after-watches")
	})

	t.Run("keyed runs to its end", func(t *testing.T) {
		// The retry repeats the query (part of the request's fingerprint).
		target := px.URL + "/v1/chat/completions?test_delay_ms=700&test_id=abandon-keyed"
		req := chatRequest(t, target, `{"model":"gpt-4o-mini"}`, map[string]string{"Idempotency-Key": "abandon-keyed"})
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		if resp, err := http.DefaultClient.Do(req.WithContext(ctx)); err == nil {
			resp.Body.Close()
			t.Fatal("the client was meant to give up before the answer")
		}
		apptest.Eventually(t, 10*time.Second, func() bool {
			s := upstreamSaw(up, "abandon-keyed")
			return s != nil && isClosed(s.Ended)
		}, "the keyed call did not finish upstream")
		if upstreamSaw(up, "abandon-keyed").Cancelled {
			t.Fatal("a keyed call was cancelled when its client left")
		}
		var retry result
		apptest.Eventually(t, 5*time.Second, func() bool { // 409 until the answer is stored
			retry = keyed(t, target, apptest.ClientKey, "abandon-keyed", `{"model":"gpt-4o-mini"}`, nil)
			return retry.status != http.StatusConflict
		}, "the retry kept getting 409")
		if retry.status != 200 {
			t.Fatalf("the retry got %d %s", retry.status, retry.body)
		}
		if !retry.replayed {
			t.Error("the retry was not a replay")
		}
		if n := upstreamCalls(up, "abandon-keyed"); n != 1 {
			t.Errorf("the call executed upstream %d times, want once (the retry is a replay)", n)
		}
	})
}

// afterWatchBegan is an upstream delay, in milliseconds, well past the
// 20 ms after which a call starts watching its client (watchDelay).
const afterWatchBegan = 80

func upstreamSaw(up *apptest.Upstream, id string) *apptest.Seen {
	for _, r := range up.Requests() {
		if r.ID == id {
			return &r
		}
	}
	return nil
}

// upstreamCalls counts the requests with this test_id the upstream saw.
func upstreamCalls(up *apptest.Upstream, id string) int {
	n := 0
	for _, r := range up.Requests() {
		if r.ID == id {
			n++
		}
	}
	return n
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// lastLog waits for a request log row that matches and returns it.
func lastLog(t *testing.T, px *apptest.Instance, match func(models.RequestLog) bool) models.RequestLog {
	t.Helper()
	var found models.RequestLog
	apptest.Eventually(t, 10*time.Second, func() bool {
		page, err := px.App.Store.ListRequestLogs(context.Background(), models.LogFilter{Limit: 100})
		if err != nil {
			return false
		}
		for _, r := range page.Logs {
			if match(r) {
				found = r
				return true
			}
		}
		return false
	}, "no matching request log row")
	return found
}

// UPSTREAM_TIMEOUT bounds the whole call from the request on, also while
// the upstream trickles its response header a byte at a time (each byte
// within the silence limits).
func TestUpstreamTimeoutBoundsTheWholeCall(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	finished := make(chan bool, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		if _, err := http.ReadRequest(bufio.NewReader(conn)); err != nil {
			return
		}
		_, _ = io.WriteString(conn, "HTTP/1.1 200 OK\r\nX-Slow: ")
		for range 40 { // 4 s of header, a byte every 100 ms
			time.Sleep(100 * time.Millisecond)
			if _, err := io.WriteString(conn, "z"); err != nil {
				finished <- false
				return
			}
		}
		_, _ = io.WriteString(conn, "\r\nContent-Length: 2\r\n\r\n{}")
		finished <- true
	}()
	px := apptest.Start(t, "http://"+ln.Addr().String(), map[string]string{"UPSTREAM_TIMEOUT": "1s", "UPSTREAM_FIRST_BYTE_TIMEOUT": "1s"})
	resp, body := do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(`{}`), map[string]string{"Content-Type": "application/json"})
	if resp.StatusCode != http.StatusGatewayTimeout {
		t.Errorf("status %d %s, want 504", resp.StatusCode, body)
	}
	if <-finished {
		t.Error("the upstream was allowed to finish a call longer than UPSTREAM_TIMEOUT")
	}
}

// Header blocks far beyond the read buffer pass; the upstream's CORS
// headers never reach clients, whatever the proxy's own policy.
func TestUpstreamResponseHeaders(t *testing.T) {
	up := apptest.NewUpstreamWith(t, func(s *httptest.Server) {
		next := s.Config.Handler
		s.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Access-Control-Allow-Origin", "*")
			w.Header().Set("Access-Control-Allow-Credentials", "true")
			w.Header().Set("Access-Control-Expose-Headers", "X-Secret")
			next.ServeHTTP(w, r)
		})
	})
	t.Run("40 KiB header", func(t *testing.T) {
		px := apptest.Start(t, up.URL, nil)
		resp, body := do(t, "GET", px.URL+"/v1/models?test_header_kib=40", apptest.ClientKey, nil, nil)
		if resp.StatusCode != 200 || len(resp.Header.Get("X-Large")) != 40<<10 {
			t.Fatalf("status %d, X-Large %d bytes: %s", resp.StatusCode, len(resp.Header.Get("X-Large")), body)
		}
	})
	t.Run("CORS closed", func(t *testing.T) {
		px := apptest.Start(t, up.URL, nil)
		resp, _ := do(t, "GET", px.URL+"/v1/models", apptest.ClientKey, nil, map[string]string{"Origin": "https://evil.example"})
		for name := range resp.Header {
			if strings.HasPrefix(name, "Access-Control-") {
				t.Errorf("upstream CORS header reached the client: %s: %s", name, resp.Header.Get(name))
			}
		}
	})
	t.Run("CORS open to one origin", func(t *testing.T) {
		px := apptest.Start(t, up.URL, map[string]string{"CORS_ALLOWED_ORIGINS": "https://app.example"})
		resp, _ := do(t, "GET", px.URL+"/v1/models", apptest.ClientKey, nil, map[string]string{"Origin": "https://app.example"})
		if got := resp.Header.Get("Access-Control-Allow-Origin"); got != "https://app.example" {
			t.Errorf("Access-Control-Allow-Origin %q, want the proxy's own", got)
		}
		if got := resp.Header.Get("Access-Control-Allow-Credentials"); got != "" {
			t.Errorf("upstream's Access-Control-Allow-Credentials reached the client: %q", got)
		}
		if got := resp.Header.Get("Access-Control-Expose-Headers"); strings.Contains(got, "X-Secret") {
			t.Errorf("upstream's Access-Control-Expose-Headers reached the client: %q", got)
		}
	})
}

// A client that stops reading a keyed stream holds neither its connection
// nor its key past the delivery bound: the proxy reads the answer to its end
// without it, stores it, and the retry is a replay.
func TestStalledReaderReleasesItsKey(t *testing.T) {
	up := apptest.NewUpstream(t)
	// Strict mode: the retries poll for the stored record rather than join
	// the stretched attempt under an UPSTREAM_TIMEOUT of their own. The
	// timeout also bounds the delivery of the 10 MiB replay, which under
	// -race on a loaded machine took more than 2 s.
	px := apptest.Start(t, up.URL, map[string]string{"UPSTREAM_TIMEOUT": "5s", "UPSTREAM_FIRST_BYTE_TIMEOUT": "2s", "IDEMPOTENCY_MAX_BODY": "64MiB",
		"IDEMPOTENCY_JOIN_WAIT": "0"})
	// 40 events of 256 KiB: far more than the sockets buffer, sent at once.
	body := `{"model":"gpt-4o-mini","stream":true}`
	steer := "test_events=40&test_pad_kib=256" // repeated by the retry: part of the fingerprint
	apptest.StalledClient(t, px.URL, apptest.ClientKey, "stalled-reader", body, steer)
	var retry result
	apptest.Eventually(t, 20*time.Second, func() bool {
		retry = keyed(t, px.URL+"/v1/chat/completions?"+steer, apptest.ClientKey, "stalled-reader", body, nil)
		return retry.status == 200
	}, "the key of a stalled reader was not settled")
	if !retry.replayed || !strings.Contains(string(retry.body), "[DONE]") {
		t.Errorf("retry: replayed=%v, %d bytes", retry.replayed, len(retry.body))
	}
	if n := up.Calls(); n != 1 {
		t.Errorf("upstream calls %d, want 1", n)
	}
}
