package proxy

import (
	"bytes"
	"strings"

	"github.com/valyala/fasthttp"
)

// hopByHop are the connection-level headers a proxy must not forward
// (RFC 9110 §7.6.1, and the list net/http/httputil's ReverseProxy uses).
var hopByHop = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// prepareUpstreamRequest rewrites the client's request headers for upstream:
// the client's key is replaced by the server's, hop-by-hop headers (and any
// named in Connection) go, and so do headers that belong to the client's
// side only: cookies (a dashboard session must never leave the proxy),
// forwarding headers we cannot vouch for, and Accept-Encoding, so upstream
// answers in identity encoding and usage can be read from the body.
func prepareUpstreamRequest(h *fasthttp.RequestHeader, authorization string) {
	for _, name := range connectionTokens(h.Peek("Connection")) {
		h.Del(name)
	}
	for _, name := range hopByHop {
		h.Del(name)
	}
	for _, name := range []string{"Cookie", "Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-Ip", "Accept-Encoding", "Origin", "Referer"} {
		h.Del(name)
	}
	h.Del("Authorization") // every one: a second could be another client's key
	h.Set("Authorization", authorization)
}

// cleanResponseHeaders drops what must not reach the client from upstream:
// hop-by-hop headers, cookies set for the upstream's domain, and the
// upstream's CORS policy (the proxy answers with its own, closed unless
// CORS_ALLOWED_ORIGINS is set). Content-Length and Transfer-Encoding are
// re-derived by fasthttp.
func cleanResponseHeaders(h *fasthttp.ResponseHeader) {
	for _, name := range connectionTokens(h.Peek("Connection")) {
		h.Del(name)
	}
	for _, name := range hopByHop {
		h.Del(name)
	}
	h.Del("Set-Cookie")
	h.Del("Alt-Svc")
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

func connectionTokens(v []byte) []string {
	if len(v) == 0 {
		return nil // most requests: no allocation
	}
	var out []string
	for _, t := range bytes.Split(v, []byte(",")) {
		if t = bytes.TrimSpace(t); len(t) > 0 && !strings.EqualFold(string(t), "close") && !strings.EqualFold(string(t), "keep-alive") {
			out = append(out, string(t))
		}
	}
	return out
}

// replayableHeader reports whether a response header is stored with an
// idempotency record and sent again on replay: the content type, request
// id and OpenAI's own headers. Rate-limit headers describe the moment of the
// first call, not the replay, so they are not replayed.
func replayableHeader(name string) bool {
	n := strings.ToLower(name)
	switch n {
	case "content-type", "x-request-id", "content-encoding":
		return true
	}
	return strings.HasPrefix(n, "openai-")
}

// validHeaderNames reports whether every request header name is an RFC 9110
// token; fasthttp accepts some that are not (a space inside), which
// upstreams then refuse or, worse, read differently.
func validHeaderNames(h *fasthttp.RequestHeader) bool {
	for k := range h.All() {
		if len(k) == 0 {
			return false
		}
		for _, c := range k {
			if !isTokenChar(c) {
				return false
			}
		}
	}
	return true
}

func isTokenChar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}
