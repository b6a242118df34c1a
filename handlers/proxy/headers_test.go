package proxy

import (
	"bufio"
	"strings"
	"testing"

	"github.com/valyala/fasthttp"
)

// Table tests in the style of Caddy's reverseproxy header tests: a header
// block in, the fields that must and must not come out.

func requestHeader(t *testing.T, raw string) *fasthttp.RequestHeader {
	t.Helper()
	var h fasthttp.RequestHeader
	if err := h.Read(bufioReader("POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n" + raw + "\r\n")); err != nil {
		t.Fatal(err)
	}
	return &h
}

func responseHeader(t *testing.T, raw string) *fasthttp.ResponseHeader {
	t.Helper()
	var h fasthttp.ResponseHeader
	if err := h.Read(bufioReader("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + raw + "\r\n")); err != nil {
		t.Fatal(err)
	}
	return &h
}

func TestPrepareUpstreamRequest(t *testing.T) {
	const key = "Bearer sk-upstream"
	for _, tc := range []struct {
		name   string
		in     string
		want   map[string]string // field: value after
		absent []string
	}{
		{name: "client key replaced", in: "Authorization: Bearer client-key\r\n",
			want: map[string]string{"Authorization": key}},
		{name: "every Authorization replaced", in: "Authorization: Bearer a\r\nAuthorization: Bearer b\r\n",
			want: map[string]string{"Authorization": key}},
		{name: "key added when absent", in: "",
			want: map[string]string{"Authorization": key}},
		{name: "hop-by-hop headers dropped",
			in:     "Keep-Alive: timeout=5\r\nProxy-Authorization: Basic x\r\nProxy-Connection: keep-alive\r\nTe: trailers\r\nTrailer: X\r\nUpgrade: websocket\r\n",
			absent: []string{"Keep-Alive", "Proxy-Authorization", "Proxy-Connection", "Te", "Trailer", "Upgrade"}},
		{name: "headers named in Connection dropped", in: "Connection: X-Secret, keep-alive\r\nX-Secret: 1\r\nX-Kept: 2\r\n",
			want: map[string]string{"X-Kept": "2"}, absent: []string{"X-Secret", "Connection"}},
		{name: "forged forwarding headers dropped",
			in:     "Forwarded: for=1.2.3.4\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Proto: https\r\nX-Real-Ip: 1.2.3.4\r\n",
			absent: []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-Ip"}},
		{name: "client-side headers dropped", in: "Cookie: session=1\r\nAccept-Encoding: gzip\r\nOrigin: https://a\r\nReferer: https://a/b\r\n",
			absent: []string{"Cookie", "Accept-Encoding", "Origin", "Referer"}},
		{name: "API headers kept", in: "Content-Type: application/json\r\nOpenAI-Organization: org-1\r\nIdempotency-Key: k\r\n",
			want: map[string]string{"Content-Type": "application/json", "OpenAI-Organization": "org-1", "Idempotency-Key": "k"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := requestHeader(t, tc.in)
			prepareUpstreamRequest(h, key)
			for k, v := range tc.want {
				if got := string(h.Peek(k)); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
			if n := strings.Count(h.String(), "Authorization:"); n != 1 {
				t.Errorf("%d Authorization fields, want 1:\n%s", n, h.String())
			}
			for _, k := range tc.absent {
				if v := h.Peek(k); v != nil {
					t.Errorf("%s forwarded: %q", k, v)
				}
			}
		})
	}
}

func TestCleanResponseHeaders(t *testing.T) {
	for _, tc := range []struct {
		name   string
		in     string
		want   map[string]string
		absent []string
	}{
		{name: "hop-by-hop headers dropped", in: "Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: X\r\nUpgrade: h2c\r\n",
			absent: []string{"Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"}},
		{name: "headers named in Connection dropped", in: "Connection: X-Internal\r\nX-Internal: 1\r\n",
			absent: []string{"X-Internal", "Connection"}},
		{name: "upstream cookies and Alt-Svc dropped", in: "Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nAlt-Svc: h3=\":443\"\r\n",
			absent: []string{"Set-Cookie", "Alt-Svc"}},
		{name: "upstream CORS policy dropped, any case",
			in:     "Access-Control-Allow-Origin: *\r\naccess-control-allow-credentials: true\r\nAccess-Control-Expose-Headers: X\r\n",
			absent: []string{"Access-Control-Allow-Origin", "Access-Control-Allow-Credentials", "Access-Control-Expose-Headers"}},
		{name: "API headers kept",
			in:   "Content-Type: application/json\r\nX-Request-Id: req_1\r\nOpenAI-Processing-Ms: 12\r\nX-Ratelimit-Remaining-Requests: 9\r\n",
			want: map[string]string{"Content-Type": "application/json", "X-Request-Id": "req_1", "OpenAI-Processing-Ms": "12", "X-Ratelimit-Remaining-Requests": "9"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := responseHeader(t, tc.in)
			cleanResponseHeaders(h)
			for k, v := range tc.want {
				if got := string(h.Peek(k)); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
			for _, k := range tc.absent {
				if v := h.Peek(k); v != nil {
					t.Errorf("%s passed to the client: %q", k, v)
				}
			}
		})
	}
}

func bufioReader(s string) *bufio.Reader { return bufio.NewReader(strings.NewReader(s)) }
