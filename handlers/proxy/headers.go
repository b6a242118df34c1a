package proxy

import (
	"bytes"
	"slices"
	"strings"

	"github.com/valyala/fasthttp"
	"golang.org/x/net/http/httpguts"
)

// hopByHop are the connection-level headers a proxy must not forward
// (RFC 9110 §7.6.1, and the list net/http/httputil's ReverseProxy uses).
var hopByHop = [...]string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// clientSideOnly are request headers that belong to the client's side:
// cookies (a dashboard session must never leave the proxy), forwarding
// headers we cannot vouch for, Accept-Encoding (upstream answers in
// identity encoding, so usage can be read from the body), Origin and
// Referer.
var clientSideOnly = [...]string{
	"Cookie", "Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-Ip",
	"Accept-Encoding", "Origin", "Referer",
}

// notForwarded is every request header dropped by name. secretFields are
// deleted whether or not a pass over the headers saw them: Del also
// clears fasthttp's trailer fields, which that pass does not visit.
var (
	notForwarded = slices.Concat(hopByHop[:], clientSideOnly[:])
	secretFields = []string{"Authorization", "Proxy-Authorization", "Cookie"}
)

// prepareUpstreamRequest rewrites the client's request headers for upstream:
// the client's key is replaced by the server's, and hop-by-hop headers (and
// any named in Connection) and client-side ones go.
//
// One pass over the headers finds which of them came (most requests bring
// none) and only those are deleted: a Del per name costs a copy and
// normalisation of the name and two scans of every field, and twenty of
// them were about 5% of the proxy's CPU per request (issue 15). Del still
// removes each, as it knows where fasthttp keeps Cookie, Connection and
// the other fields it stores apart.
func prepareUpstreamRequest(h *fasthttp.RequestHeader, authorization string) {
	for _, name := range connectionTokens(h.Peek("Connection")) {
		h.Del(name)
	}
	var came [len(hopByHop) + len(clientSideOnly)]bool // by index in notForwarded
	for k := range h.All() {
		if i := indexFold(notForwarded, k); i >= 0 {
			came[i] = true
		}
	}
	for i, name := range notForwarded {
		if came[i] {
			h.Del(name)
		}
	}
	for _, name := range secretFields {
		h.Del(name) // every Authorization: a second could be another client's key
	}
	h.Set("Authorization", authorization)
}

// notReturned is every response header dropped by name.
var notReturned = slices.Concat(hopByHop[:], upstreamSideOnly[:])

// upstreamSideOnly are response headers about the upstream's own domain.
var upstreamSideOnly = [...]string{"Set-Cookie", "Alt-Svc"}

// cleanResponseHeaders drops what must not reach the client from upstream:
// hop-by-hop headers, cookies set for the upstream's domain, and the
// upstream's CORS policy (the proxy answers with its own, closed unless
// CORS_ALLOWED_ORIGINS is set). Content-Length and Transfer-Encoding are
// re-derived by fasthttp. As for requests, one pass finds what came.
func cleanResponseHeaders(h *fasthttp.ResponseHeader) {
	for _, name := range connectionTokens(h.Peek("Connection")) {
		h.Del(name)
	}
	var came [len(hopByHop) + len(upstreamSideOnly)]bool // by index in notReturned
	var cors []string
	for k := range h.All() {
		if i := indexFold(notReturned, k); i >= 0 {
			came[i] = true
		} else if len(k) > len("Access-Control-") && strings.EqualFold(string(k[:len("Access-Control-")]), "Access-Control-") {
			cors = append(cors, string(k))
		}
	}
	for i, name := range notReturned {
		if came[i] {
			h.Del(name)
		}
	}
	for _, name := range cors {
		h.Del(name)
	}
}

// indexFold is the index of name in names, compared without regard to
// case, or -1.
func indexFold(names []string, name []byte) int {
	for i, n := range names {
		if len(n) == len(name) && strings.EqualFold(n, string(name)) {
			return i
		}
	}
	return -1
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
func replayableHeader(name []byte) bool {
	for _, n := range [...]string{"Content-Type", "X-Request-Id", "Content-Encoding"} {
		if len(name) == len(n) && strings.EqualFold(string(name), n) {
			return true
		}
	}
	return len(name) >= len("OpenAI-") && strings.EqualFold(string(name[:len("OpenAI-")]), "OpenAI-")
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
			if !httpguts.IsTokenRune(rune(c)) {
				return false
			}
		}
	}
	return true
}
