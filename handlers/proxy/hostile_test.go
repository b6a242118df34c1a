package proxy_test

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// sendRaw writes bytes to the proxy exactly as given (half-closing after
// them when closeWrite) and reads one response.
func sendRaw(t *testing.T, proxyURL, raw string, closeWrite bool) (*http.Response, string) {
	t.Helper()
	u, _ := url.Parse(proxyURL)
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, raw); err != nil {
		t.Fatal(err)
	}
	if closeWrite {
		_ = conn.(*net.TCPConn).CloseWrite()
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("no response: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// wantOpenAIError checks status, the JSON error shape and its code.
func wantOpenAIError(t *testing.T, resp *http.Response, body string, status int, code string) {
	t.Helper()
	var e struct {
		Error struct{ Message, Type, Code string } `json:"error"`
	}
	if resp.StatusCode != status || json.Unmarshal([]byte(body), &e) != nil || e.Error.Code != code || e.Error.Message == "" {
		t.Errorf("got %d %q, want %d with OpenAI error code %q", resp.StatusCode, body, status, code)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("Content-Type %q, want JSON", ct)
	}
}

func TestHostileRequests(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	host := strings.TrimPrefix(px.URL, "http://")

	t.Run("a second Authorization never reaches upstream", func(t *testing.T) {
		resp, body := sendRaw(t, px.URL, "POST /v1/echo?test_id=two-auth HTTP/1.1\r\nHost: "+host+"\r\nAuthorization: Bearer "+apptest.ClientKey+
			"\r\nAuthorization: Bearer "+apptest.ClientKey2+"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", false)
		if resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, body)
		}
		seen := upstreamSaw(up, "two-auth")
		if got := seen.Header.Values("Authorization"); len(got) != 1 || got[0] != "Bearer "+apptest.UpstreamKey {
			t.Errorf("upstream got Authorization %q, want exactly the server's", got)
		}
	})

	t.Run("TRACE is not forwarded", func(t *testing.T) {
		before := up.Calls()
		resp, body := sendRaw(t, px.URL, "TRACE /v1/models HTTP/1.1\r\nHost: "+host+"\r\nAuthorization: Bearer "+apptest.ClientKey+"\r\nConnection: close\r\n\r\n", false)
		wantOpenAIError(t, resp, body, 405, "method_not_allowed")
		if up.Calls() != before {
			t.Error("TRACE reached the upstream")
		}
	})

	t.Run("a model sent twice is refused, not guessed at", func(t *testing.T) {
		// gjson would read the first copy and most decoders upstream the
		// last: allowed models and prices would judge another request.
		before := up.Calls()
		resp, body := do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey,
			strings.NewReader(`{"model":"gpt-4o-mini","messages":[],"model":"gpt-4.1"}`), map[string]string{"Content-Type": "application/json"})
		wantOpenAIError(t, resp, string(body), 400, "duplicate_field")
		if up.Calls() != before {
			t.Error("a body with two models reached the upstream")
		}
	})

	t.Run("JSON body shorter than declared is the client's error", func(t *testing.T) {
		before := up.Calls()
		resp, body := sendRaw(t, px.URL, "POST /v1/chat/completions HTTP/1.1\r\nHost: "+host+"\r\nAuthorization: Bearer "+apptest.ClientKey+
			"\r\nContent-Type: application/json\r\nContent-Length: 9000000\r\n\r\n{\"model\":\"gpt-4o-mini\"", true)
		wantOpenAIError(t, resp, body, 400, "invalid_request_body")
		if up.Calls() != before {
			t.Error("a truncated body was forwarded")
		}
	})

	t.Run("unparsable requests are answered in JSON without echoing them", func(t *testing.T) {
		auth := "\r\nAuthorization: Bearer " + apptest.ClientKey + "\r\nCookie: session=secret-cookie-value"
		for _, tc := range []struct {
			name, raw, code string
			status          int
		}{
			{"lowercase method", "get /v1/models HTTP/1.1\r\nHost: " + host + auth, "method_not_allowed", 405},
			{"unknown method", "BREW /v1/models HTTP/1.1\r\nHost: " + host + auth, "method_not_allowed", 405},
			{"control byte in a value", "GET /v1/models HTTP/1.1\r\nHost: " + host + auth + "\r\nX-Bad: a\x01b", "malformed_request", 400},
			{"space in a name", "GET /v1/models HTTP/1.1\r\nHost: " + host + auth + "\r\nBad Name: x", "malformed_request", 400},
			{"oversized headers", "GET /v1/models HTTP/1.1\r\nHost: " + host + auth + "\r\nX-Big: " + strings.Repeat("b", 64<<10), "request_headers_too_large", 431},
		} {
			before := up.Calls()
			resp, body := sendRaw(t, px.URL, tc.raw+"\r\nConnection: close\r\n\r\n", false)
			wantOpenAIError(t, resp, body, tc.status, tc.code)
			if strings.Contains(body, apptest.ClientKey) || strings.Contains(body, "secret-cookie-value") || strings.Contains(body, "Host:") {
				t.Errorf("%s: the answer quotes the request: %s", tc.name, body)
			}
			if up.Calls() != before {
				t.Errorf("%s: reached the upstream", tc.name)
			}
		}
	})

	t.Run("refused requests are logged with their path", func(t *testing.T) {
		resp, _ := do(t, "POST", px.URL+"/v1/chat/completions?x=1", "pk-wrong-key-0123456789", strings.NewReader(`{}`), nil)
		if resp.StatusCode != 401 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		rec := lastLog(t, px, func(r models.RequestLog) bool { return r.Outcome == models.OutcomeUnauthorized })
		if rec.Path != "/v1/chat/completions" {
			t.Errorf("logged path %q", rec.Path)
		}
	})

	// Last: the upstream may count this upload after the answer, which
	// would throw off a later subtest's count of upstream calls.
	t.Run("malformed chunked upload is the client's error", func(t *testing.T) {
		resp, body := sendRaw(t, px.URL, "POST /v1/files HTTP/1.1\r\nHost: "+host+"\r\nAuthorization: Bearer "+apptest.ClientKey+
			"\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz-not-a-size\r\n", true)
		wantOpenAIError(t, resp, body, 400, "invalid_request_body")
	})
}

// TestDeeplyNestedAnswerIsStoredAndReplayed: a keyed answer of 10 MiB of
// "[" (an upstream echoing a hostile body, say), with its length, is
// stored and replayed as it came. Reading its usage once overflowed the
// goroutine's stack, a fatal error that took the whole proxy down.
func TestDeeplyNestedAnswerIsStoredAndReplayed(t *testing.T) {
	answer := strings.Repeat("[", 10<<20)
	var calls atomic.Int64
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(answer)))
		_, _ = io.WriteString(w, answer)
	}))
	t.Cleanup(up.Close)
	px := apptest.Start(t, up.URL, map[string]string{"IDEMPOTENCY_MAX_BODY": "16MiB"})
	url := px.URL + "/v1/chat/completions"
	first := keyed(t, url, apptest.ClientKey, "deep-json", chatBody, nil)
	if first.status != 200 || string(first.body) != answer {
		t.Fatalf("first: %d, %d bytes", first.status, len(first.body))
	}
	again := keyed(t, url, apptest.ClientKey, "deep-json", chatBody, nil)
	if !again.replayed || string(again.body) != answer {
		t.Fatalf("repeat: replayed=%v, %d bytes", again.replayed, len(again.body))
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("upstream calls = %d, want 1", n)
	}
}
