package proxy_test

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// do sends a request to the proxy and returns the response with its body read.
func do(t *testing.T, method, url, key string, body io.Reader, header map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	return resp, b
}

// chatRequest builds an authorised JSON POST with extra headers.
func chatRequest(t *testing.T, url, body string, hdr map[string]string) *http.Request {
	t.Helper()
	req, err := http.NewRequest("POST", url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
	req.Header.Set("Content-Type", "application/json")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	return req
}

// abandonAfterEvents reads n SSE events of req's response, then drops the
// connection, as a client that gives up does.
func abandonAfterEvents(t *testing.T, req *http.Request, n int) {
	t.Helper()
	tr := &http.Transport{}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(resp.Body)
	for seen := 0; seen < n && sc.Scan(); {
		if strings.HasPrefix(sc.Text(), "data: ") {
			seen++
		}
	}
	resp.Body.Close()
	tr.CloseIdleConnections()
}

// assertAPIError checks OpenAI's error shape and the code.
func assertAPIError(t *testing.T, resp *http.Response, body []byte, status int, code string) {
	t.Helper()
	if resp.StatusCode != status {
		t.Fatalf("status = %d, want %d; body %s", resp.StatusCode, status, body)
	}
	var e struct {
		Error struct {
			Message, Type, Code string
		}
	}
	if err := json.Unmarshal(body, &e); err != nil || e.Error.Message == "" || e.Error.Type == "" {
		t.Fatalf("not an OpenAI error body: %s", body)
	}
	if code != "" && e.Error.Code != code {
		t.Fatalf("error code = %q, want %q", e.Error.Code, code)
	}
}

func assertNoSecrets(t *testing.T, where string, texts ...string) {
	t.Helper()
	for _, s := range texts {
		for _, k := range []string{apptest.UpstreamKey, apptest.ClientKey, apptest.ClientKey2} {
			if strings.Contains(s, k) {
				t.Fatalf("%s contains a key", where)
			}
		}
	}
}

func TestForwardingRewritesPathHeadersAndKey(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL+"/api/v1/", nil)

	body := []byte(`{"model":"gpt-4o-mini","input":"hello"}`)
	resp, got := do(t, "POST", px.URL+"/v1/echo/a/./b?x=1&y=%20z", apptest.ClientKey, bytes.NewReader(body), map[string]string{
		"Content-Type":        "application/json",
		"OpenAI-Organization": "org-123",
		"OpenAI-Beta":         "assistants=v2",
		"Connection":          "X-Hop-Secret",
		"X-Hop-Secret":        "must-not-pass",
		"Cookie":              "session=dashboard",
		"X-Forwarded-For":     "6.6.6.6",
	})
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, got)
	}
	reqs := up.Requests()
	if len(reqs) != 1 {
		t.Fatalf("upstream saw %d requests, want 1", len(reqs))
	}
	seen := reqs[0]
	if seen.Method != "POST" || seen.Path != "/api/v1/echo/a/b" || seen.Query != "x=1&y=%20z" {
		t.Fatalf("upstream saw %s %s ? %s", seen.Method, seen.Path, seen.Query)
	}
	if seen.BodyLen != len(body) {
		t.Fatalf("upstream body length %d, want %d", seen.BodyLen, len(body))
	}
	if got := seen.Header.Get("Authorization"); got != "Bearer "+apptest.UpstreamKey {
		t.Fatalf("upstream Authorization = %q, want the server key", got)
	}
	for _, h := range []string{"X-Hop-Secret", "Cookie", "X-Forwarded-For"} {
		if v := seen.Header.Get(h); v != "" {
			t.Fatalf("upstream received %s: %q", h, v)
		}
	}
	if seen.Header.Get("OpenAI-Organization") != "org-123" || seen.Header.Get("OpenAI-Beta") != "assistants=v2" {
		t.Fatalf("OpenAI-* headers not forwarded: %v", seen.Header)
	}
	if resp.Header.Get("X-Request-Id") == "" || resp.Header.Get("Openai-Processing-Ms") == "" || resp.Header.Get("X-Ratelimit-Remaining-Requests") == "" {
		t.Fatalf("upstream response headers missing: %v", resp.Header)
	}
	if resp.Header.Get("Set-Cookie") != "" {
		t.Fatal("upstream Set-Cookie reached the client")
	}
	var echo map[string]any
	if err := json.Unmarshal(got, &echo); err != nil || echo["path"] != "/api/v1/echo/a/b" {
		t.Fatalf("echo body %s", got)
	}
	assertNoSecrets(t, "response", string(got), headerText(resp.Header))
}

func headerText(h http.Header) string {
	var b strings.Builder
	_ = h.Write(&b)
	return b.String()
}

func TestClientKeysAreRequired(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	for _, tc := range []struct {
		name, auth, code string
	}{
		{"missing", "", "missing_api_key"},
		{"wrong", "Bearer pk-wrong-0000000000", "invalid_api_key"},
		{"upstream key is not a client key", "Bearer " + apptest.UpstreamKey, "invalid_api_key"},
		{"not bearer", "Basic " + apptest.ClientKey, "missing_api_key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hdr := map[string]string{"Content-Type": "application/json"}
			if tc.auth != "" {
				hdr["Authorization"] = tc.auth
			}
			resp, body := do(t, "POST", px.URL+"/v1/chat/completions", "", strings.NewReader(`{"model":"m"}`), hdr)
			assertAPIError(t, resp, body, 401, tc.code)
			assertNoSecrets(t, "401 response", string(body))
		})
	}
	// The second client key works too.
	resp, _ := do(t, "GET", px.URL+"/v1/models", apptest.ClientKey2, nil, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("second client key: status %d", resp.StatusCode)
	}
	if n := up.Calls(); n != 1 {
		t.Fatalf("upstream calls = %d, want 1 (only the authorised request)", n)
	}
}

func TestStreamingDeliversEventsAsTheyAreProduced(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)

	req := chatRequest(t, px.URL+"/v1/chat/completions?test_events=10&test_interval_ms=100", `{"model":"gpt-4o-mini","stream":true,"messages":[]}`, nil)
	start := time.Now()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
		t.Fatalf("content type %q", ct)
	}
	var arrivals []time.Duration
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "data: ") {
			arrivals = append(arrivals, time.Since(start))
		}
	}
	// 10 deltas, the finish chunk, [DONE]: the usage chunk the proxy asked
	// for is hidden from a client that did not.
	if len(arrivals) != 12 {
		t.Fatalf("got %d events, want 12", len(arrivals))
	}
	// Upstream spends ~900 ms between the first and the last event. A
	// buffering proxy delivers them all at once, at the end.
	spread := arrivals[len(arrivals)-1] - arrivals[0]
	if spread < 700*time.Millisecond {
		t.Fatalf("events arrived within %v of each other: the stream was buffered (arrivals %v)", spread, arrivals)
	}
	for i := 1; i < 10; i++ {
		if gap := arrivals[i] - arrivals[i-1]; gap < 50*time.Millisecond {
			t.Fatalf("events %d and %d arrived %v apart, want ~100ms: %v", i-1, i, gap, arrivals)
		}
	}
}

func TestUnkeyedClientDisconnectCancelsUpstream(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)

	req := chatRequest(t, px.URL+"/v1/chat/completions?test_events=200&test_interval_ms=50", `{"model":"m","stream":true}`, nil)
	abandonAfterEvents(t, req, 2)
	seen := up.Requests()[0]
	select {
	case <-seen.Ended:
	case <-time.After(5 * time.Second):
		t.Fatal("upstream request still running 5s after the client left")
	}
	if up.Cancelled() != 1 || up.Completed() != 0 {
		t.Fatalf("upstream cancelled=%d completed=%d, want 1 and 0", up.Cancelled(), up.Completed())
	}
}

func TestCORS(t *testing.T) {
	up := apptest.NewUpstream(t)
	preflight := func(px *apptest.Instance, origin string) *http.Response {
		req, _ := http.NewRequest("OPTIONS", px.URL+"/v1/chat/completions", nil)
		req.Header.Set("Origin", origin)
		req.Header.Set("Access-Control-Request-Method", "POST")
		req.Header.Set("Access-Control-Request-Headers", "authorization,content-type,idempotency-key,x-stainless-os")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	t.Run("closed by default", func(t *testing.T) {
		px := apptest.Start(t, up.URL, nil)
		resp := preflight(px, "https://evil.example")
		if v := resp.Header.Get("Access-Control-Allow-Origin"); v != "" {
			t.Fatalf("Allow-Origin %q with no origins configured", v)
		}
	})
	t.Run("allowed origin", func(t *testing.T) {
		px := apptest.Start(t, up.URL, map[string]string{"CORS_ALLOWED_ORIGINS": "https://app.example"})
		resp := preflight(px, "https://app.example")
		if resp.StatusCode != http.StatusNoContent || resp.Header.Get("Access-Control-Allow-Origin") != "https://app.example" {
			t.Fatalf("preflight: %d %v", resp.StatusCode, resp.Header)
		}
		allowed := strings.ToLower(resp.Header.Get("Access-Control-Allow-Headers"))
		for _, h := range []string{"authorization", "idempotency-key", "x-stainless-os", "openai-organization"} {
			if !strings.Contains(allowed, h) {
				t.Fatalf("Allow-Headers %q lacks %s", allowed, h)
			}
		}
		if v := preflight(px, "https://evil.example").Header.Get("Access-Control-Allow-Origin"); v != "" {
			t.Fatalf("other origin allowed: %q", v)
		}
		r, _ := http.NewRequest("GET", px.URL+"/v1/models", nil)
		r.Header.Set("Origin", "https://app.example")
		r.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
		actual, err := http.DefaultClient.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		actual.Body.Close()
		if !strings.Contains(strings.ToLower(actual.Header.Get("Access-Control-Expose-Headers")), "idempotent-replayed") {
			t.Fatalf("Expose-Headers = %q", actual.Header.Get("Access-Control-Expose-Headers"))
		}
	})
	if n := up.Calls(); n != 1 {
		t.Fatalf("upstream calls = %d: preflights must not be forwarded", n)
	}
}

// rawRequest sends a request line exactly as written, so no client library
// cleans the path first.
func rawRequest(t *testing.T, proxyURL, target, key string) (int, string) {
	t.Helper()
	host := strings.TrimPrefix(proxyURL, "http://")
	resp, body := sendRaw(t, proxyURL, "GET "+target+" HTTP/1.1\r\nHost: "+host+"\r\nAuthorization: Bearer "+key+"\r\nConnection: close\r\n\r\n", false)
	return resp.StatusCode, body
}

func TestPathNormalisation(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL+"/base", map[string]string{"ADMIN_PASSWORD": "correct-horse-battery"})
	for _, tc := range []struct {
		target   string
		status   int
		upstream string // path upstream must see, or "" for none
	}{
		{"/v1/../dashboard", 404, ""},
		{"/v1/%2e%2e/dashboard", 404, ""},
		{"/v1/%2E%2E/%2E%2E/etc/passwd", 404, ""},
		{"/v1/chat/../../healthz", 404, ""},
		{"/v1/files%2f..%2f..%2fdashboard", 400, ""},
		{"/v1/a%5c..%5cb", 400, ""},
		{"/v1/x/%00", 400, ""},
		{"/v1/echo/./p/../q", 200, "/base/echo/q"},
		{"/v1/echo/%7Euser", 200, "/base/echo/~user"},
	} {
		t.Run(tc.target, func(t *testing.T) {
			before := len(up.Requests())
			status, body := rawRequest(t, px.URL, tc.target, apptest.ClientKey)
			if status != tc.status {
				t.Fatalf("status %d, want %d: %s", status, tc.status, body)
			}
			reqs := up.Requests()
			if tc.upstream == "" {
				if len(reqs) != before {
					t.Fatalf("request reached upstream at %s", reqs[len(reqs)-1].Path)
				}
				return
			}
			if len(reqs) != before+1 || reqs[len(reqs)-1].Path != tc.upstream {
				t.Fatalf("upstream saw %v, want %s", reqs[before:], tc.upstream)
			}
		})
	}
	// Without a key, a traversal is refused before anything else.
	if status, _ := rawRequest(t, px.URL, "/v1/../dashboard", "wrong-key-123456"); status != 401 {
		t.Fatalf("traversal without key: status %d, want 401", status)
	}
}

func TestUpstreamFailures(t *testing.T) {
	t.Run("unreachable", func(t *testing.T) {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := ln.Addr().String()
		ln.Close() // nothing listens here now
		px := apptest.Start(t, "http://"+addr+"/v1", nil)
		resp, body := do(t, "GET", px.URL+"/v1/models", apptest.ClientKey, nil, nil)
		assertAPIError(t, resp, body, 502, "upstream_unreachable")
	})
	t.Run("no first byte in time", func(t *testing.T) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, map[string]string{"UPSTREAM_FIRST_BYTE_TIMEOUT": "300ms"})
		resp, body := do(t, "GET", px.URL+"/v1/models?test_block=1", apptest.ClientKey, nil, nil)
		assertAPIError(t, resp, body, 504, "upstream_timeout")
		select {
		case <-up.Requests()[0].Ended:
		case <-time.After(5 * time.Second):
			t.Fatal("upstream request not cancelled after the timeout")
		}
	})
	t.Run("silent mid-stream", func(t *testing.T) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, map[string]string{"UPSTREAM_IDLE_TIMEOUT": "300ms"})
		req := chatRequest(t, px.URL+"/v1/chat/completions?test_events=3&test_interval_ms=2000", `{"stream":true}`, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		// A cut stream must not look like a clean end: the chunked body is
		// left unterminated, so the client sees an error after the first event.
		if resp.StatusCode != 200 || !strings.Contains(string(body), "tok0") || err == nil {
			t.Fatalf("status %d body %q err %v: want the first event, then a broken stream", resp.StatusCode, body, err)
		}
	})
	t.Run("cut before its Content-Length", func(t *testing.T) {
		// A small answer is read whole before it is sent: one cut short
		// becomes a clean 502 the SDKs retry, never a truncated 200.
		upURL, _ := rawUpstream(t, func(int) string {
			return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: req_cut\r\nContent-Length: 100\r\n\r\n{\"id\":\"chatcmpl-cut\""
		})
		px := apptest.Start(t, upURL, nil)
		resp, body := do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody), map[string]string{"Content-Type": "application/json"})
		assertAPIError(t, resp, body, 502, "upstream_cut")
		if id := resp.Header.Get("X-Request-Id"); id != "" {
			t.Errorf("the cut answer's X-Request-Id %q reached the client with the error", id)
		}
		rec := lastLog(t, px, func(r models.RequestLog) bool { return r.Path == "/v1/chat/completions" })
		if rec.Outcome != models.OutcomeUpstreamError || rec.Error == "" {
			t.Errorf("logged outcome %q error %q, want upstream_error with the cause", rec.Outcome, rec.Error)
		}
	})
	t.Run("unknown route", func(t *testing.T) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, nil)
		resp, body := do(t, "GET", px.URL+"/nope", "", nil, nil)
		assertAPIError(t, resp, body, 404, "")
	})
}

func TestBodyLimits(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"MAX_BODY_SIZE": "1MiB"})
	big := make([]byte, 3<<20)
	_, _ = rand.Read(big)

	t.Run("declared too large", func(t *testing.T) {
		resp, body := do(t, "POST", px.URL+"/v1/files", apptest.ClientKey, bytes.NewReader(big), map[string]string{"Content-Type": "application/octet-stream"})
		assertAPIError(t, resp, body, 413, "request_too_large")
	})
	t.Run("chunked outgrows the limit", func(t *testing.T) {
		pr, pw := io.Pipe()
		go func() {
			for i := 0; i < 3; i++ {
				if _, err := pw.Write(big[i<<20 : (i+1)<<20]); err != nil {
					return
				}
			}
			pw.Close()
		}()
		resp, body := do(t, "POST", px.URL+"/v1/files", apptest.ClientKey, pr, map[string]string{"Content-Type": "application/octet-stream"})
		assertAPIError(t, resp, body, 413, "request_too_large")
	})
	t.Run("within the limit streams through whole", func(t *testing.T) {
		resp, body := do(t, "POST", px.URL+"/v1/echo", apptest.ClientKey, bytes.NewReader(big[:1<<20]), map[string]string{"Content-Type": "application/octet-stream"})
		if resp.StatusCode != 200 || !strings.Contains(string(body), `"body_len":1048576`) {
			t.Fatalf("status %d body %s", resp.StatusCode, body)
		}
	})
}

func TestKeyedChunkedUploadOverTheLimit(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"MAX_BODY_SIZE": "1MiB"})
	pr, pw := io.Pipe()
	go func() {
		chunk := make([]byte, 512<<10)
		for i := 0; i < 6; i++ {
			if _, err := pw.Write(chunk); err != nil {
				return
			}
		}
		pw.Close()
	}()
	resp, body := do(t, "POST", px.URL+"/v1/files", apptest.ClientKey, pr, map[string]string{"Content-Type": "application/octet-stream", "Idempotency-Key": "big-1"})
	assertAPIError(t, resp, body, 413, "request_too_large")
	if up.Calls() != 0 {
		t.Fatal("an oversized keyed upload reached upstream")
	}
}

// TestHTTPSUpstream: the default upstream is https; the proxy speaks TLS to
// it, streams through it, and trusts extra CAs from UPSTREAM_CA_FILE.
func TestHTTPSUpstream(t *testing.T) {
	up := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+apptest.UpstreamKey {
			w.WriteHeader(401)
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		for i := 0; i < 3; i++ {
			fmt.Fprintf(w, "data: {\"n\":%d}\n\n", i)
			w.(http.Flusher).Flush()
		}
		fmt.Fprint(w, "data: [DONE]\n\n")
	}))
	defer up.Close()
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: up.Certificate().Raw})
	if err := os.WriteFile(caFile, pemBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	px := apptest.Start(t, up.URL+"/v1", map[string]string{"UPSTREAM_CA_FILE": caFile})
	resp, body := do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(`{"stream":true}`), map[string]string{"Content-Type": "application/json"})
	if resp.StatusCode != 200 || !strings.HasSuffix(string(body), "data: [DONE]\n\n") {
		t.Fatalf("over TLS: %d %q", resp.StatusCode, body)
	}
	// Without the CA the certificate is refused: 502, never plaintext.
	untrusted := apptest.Start(t, up.URL+"/v1", nil)
	resp, body = do(t, "GET", untrusted.URL+"/v1/models", apptest.ClientKey, nil, nil)
	assertAPIError(t, resp, body, 502, "upstream_unreachable")
}
