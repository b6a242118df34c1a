package proxy

import (
	"bufio"
	"iter"
	"slices"
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

// deleteEveryName is how the rewrites were written before they looked for
// what came (issue 15): a Del for every name. FuzzHeaderRewrites holds the
// faster ones to its wire output, field for field.
func deleteEveryRequestName(h *fasthttp.RequestHeader, authorization string) {
	for _, name := range connectionTokens(h.Peek("Connection")) {
		h.Del(name)
	}
	for _, name := range notForwarded {
		h.Del(name)
	}
	h.Del("Authorization")
	h.Set("Authorization", authorization)
}

func deleteEveryResponseName(h *fasthttp.ResponseHeader) {
	for _, name := range connectionTokens(h.Peek("Connection")) {
		h.Del(name)
	}
	for _, name := range notReturned {
		h.Del(name)
	}
	var cors []string
	for k := range h.All() {
		if len(k) > len("Access-Control-") && strings.EqualFold(string(k[:len("Access-Control-")]), "Access-Control-") {
			cors = append(cors, string(k))
		}
	}
	for _, name := range cors {
		h.Del(name)
	}
}

// FuzzHeaderRewrites: for any header block fasthttp accepts, the rewrites
// send exactly the fields deleting every listed name sends, in requests
// (with the client's key replaced) and in responses. Fields are compared
// in order within each name: fasthttp's Del may move other names' fields,
// which HTTP leaves unordered.
//
//	go test -run '^$' -fuzz FuzzHeaderRewrites ./handlers/proxy/
func FuzzHeaderRewrites(f *testing.F) {
	for _, seed := range []string{
		"",
		"Authorization: Bearer a\r\nauthorization: Bearer b\r\n",
		"cookie: a=1\r\nCOOKIE: b=2\r\nProxy-Authorization: Basic x\r\n",
		"Connection: close\r\n",
		"Connection: keep-alive, X-Secret\r\nx-secret: 1\r\nKeep-Alive: timeout=5\r\n",
		"Transfer-Encoding: chunked\r\nTrailer: X-T\r\nTe: trailers\r\n",
		"Content-Length: 3\r\nContent-Type: application/json\r\nUser-Agent: sdk\r\n",
		"x-forwarded-for: 1.2.3.4\r\nX-Real-IP: 1.2.3.4\r\nForwarded: for=x\r\nX-Forwarded-Host: h\r\nX-Forwarded-Proto: https\r\n",
		"Accept-Encoding: gzip\r\nOrigin: https://a\r\nReferer: https://a/b\r\nUpgrade: websocket\r\nProxy-Connection: keep-alive\r\n",
		"Set-Cookie: a=1\r\nset-cookie: b=2\r\nAlt-Svc: h3\r\nAccess-Control-Allow-Origin: *\r\naccess-control-max-age: 1\r\nProxy-Authenticate: Basic\r\n",
		"OpenAI-Organization: org\r\nIdempotency-Key: k\r\nX-Request-Id: r\r\n",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, block string) {
		const key = "Bearer sk-upstream"
		raw := "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n" + block + "\r\n"
		var got, want fasthttp.RequestHeader
		if got.Read(bufioReader(raw)) == nil && want.Read(bufioReader(raw)) == nil {
			prepareUpstreamRequest(&got, key)
			deleteEveryRequestName(&want, key)
			if !slices.Equal(fields(got.All()), fields(want.All())) {
				t.Fatalf("request after %q:\n%s\nwant:\n%s", block, got.String(), want.String())
			}
		}
		raw = "HTTP/1.1 200 OK\r\n" + block + "\r\n"
		var gotResp, wantResp fasthttp.ResponseHeader
		if gotResp.Read(bufioReader(raw)) == nil && wantResp.Read(bufioReader(raw)) == nil {
			cleanResponseHeaders(&gotResp)
			deleteEveryResponseName(&wantResp)
			if !slices.Equal(fields(gotResp.All()), fields(wantResp.All())) {
				t.Fatalf("response after %q:\n%s\nwant:\n%s", block, gotResp.String(), wantResp.String())
			}
		}
	})
}

// fields lists a header's fields as "name: value", sorted by name and in
// their order within a name.
func fields(all iter.Seq2[[]byte, []byte]) []string {
	var out []string
	for k, v := range all {
		out = append(out, string(k)+": "+string(v))
	}
	slices.SortStableFunc(out, func(a, b string) int {
		na, _, _ := strings.Cut(a, ":")
		nb, _, _ := strings.Cut(b, ":")
		return strings.Compare(strings.ToLower(na), strings.ToLower(nb))
	})
	return out
}

func TestReplayableHeader(t *testing.T) {
	for name, want := range map[string]bool{
		"Content-Type": true, "content-type": true, "X-Request-Id": true, "x-request-id": true,
		"Content-Encoding": true, "OpenAI-Processing-Ms": true, "openai-organization": true, "Openai-Version": true,
		"OpenAI-": true, "OpenAI": false, "Open": false, "": false, "Content-Length": false, "Date": false,
		"X-Ratelimit-Remaining-Requests": false, "Set-Cookie": false, "Content-Type-X": false,
	} {
		if got := replayableHeader([]byte(name)); got != want {
			t.Errorf("replayableHeader(%q) = %v, want %v", name, got, want)
		}
	}
}
