package wsproxy

import (
	"bytes"
	"net/http"
	"strings"

	"github.com/gofiber/fiber/v2"
	"github.com/valyala/fasthttp"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// keyProtocol is the subprotocol prefix browsers use to send a key, since
// they cannot set Authorization on a WebSocket (OpenAI's Realtime docs).
const keyProtocol = "openai-insecure-api-key."

var (
	errMissingKey = &handlers.APIError{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "missing_api_key", Outcome: models.OutcomeUnauthorized,
		Message: "You didn't provide a proxy API key. Send it as 'Authorization: Bearer <key>' or as the subprotocol 'openai-insecure-api-key.<key>'."}
	errOriginNotAllowed = &handlers.APIError{Status: http.StatusForbidden, Type: "invalid_request_error", Code: "origin_not_allowed", Outcome: models.OutcomeRejected,
		Message: "This origin may not open WebSocket sessions here (CORS_ALLOWED_ORIGINS)."}
	errBadHandshake = &handlers.APIError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "invalid_websocket_handshake", Outcome: models.OutcomeRejected,
		Message: "The WebSocket handshake is not valid: it needs GET, Sec-WebSocket-Key and Sec-WebSocket-Version: 13."}
)

// admit checks everything before the upstream is contacted: the path, the
// client key, the browser origin and the handshake itself.
func (p *Proxy) admit(c *fiber.Ctx, s *session) error {
	raw := string(c.Request().URI().PathOriginal())
	path, pathErr := handlers.NormalisePath(raw)
	s.rec.Path = path
	if pathErr != nil {
		s.rec.Path = truncate(raw, 200)
	}
	h := &c.Request().Header
	authorization, protocols := credentials(h)
	s.subprotocols = protocols
	if !p.cfg.AllowOpenProxy || len(p.cfg.ClientKeys) > 0 {
		if len(authorization) == 0 {
			return errMissingKey
		}
		name, err := p.authenticate(authorization, s)
		if err != nil {
			return handlers.ErrInvalidKey
		}
		s.rec.Client = name
	} else {
		s.rec.Client = "open"
	}
	if pathErr != nil {
		return pathErr
	}
	if origin := h.Peek("Origin"); len(origin) > 0 && !p.originAllowed(string(origin)) {
		return errOriginNotAllowed
	}
	if !c.Request().Header.IsGet() || len(h.Peek("Sec-WebSocket-Key")) == 0 ||
		string(bytes.TrimSpace(h.Peek("Sec-WebSocket-Version"))) != "13" {
		return errBadHandshake
	}
	s.rec.Model = truncate(string(c.Request().URI().QueryArgs().Peek("model")), 200)
	return p.admitLimits(c, s)
}

// credentials returns the Authorization value to check ("Bearer <key>")
// and the client's subprotocols without any key-carrying one. The header
// wins over the subprotocol when both are sent; the subprotocol key is
// dropped either way, so it never reaches upstream or an answer.
func credentials(h *fasthttp.RequestHeader) ([]byte, []string) {
	authorization := h.Peek("Authorization")
	var protocols []string
	var fromProtocol string
	for _, field := range h.PeekAll("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(string(field), ",") {
			p = strings.TrimSpace(p)
			switch {
			case p == "":
			case strings.HasPrefix(p, keyProtocol):
				if fromProtocol == "" {
					fromProtocol = strings.TrimPrefix(p, keyProtocol)
				}
			default:
				protocols = append(protocols, p)
			}
		}
	}
	if len(authorization) == 0 && fromProtocol != "" {
		authorization = []byte("Bearer " + fromProtocol)
	}
	return authorization, protocols
}

func (p *Proxy) originAllowed(origin string) bool {
	for _, o := range p.cfg.AllowedOrigins {
		if o == "*" || strings.EqualFold(strings.TrimRight(o, "/"), origin) {
			return true
		}
	}
	return false
}

// notForwarded are the client headers that stay at the proxy: credentials,
// hop-by-hop and handshake headers (the dialer makes its own, and offers
// no extension, so no permessage-deflate), and the client's side only.
var notForwarded = map[string]bool{
	"Authorization": true, "Host": true, "Content-Length": true,
	"Connection": true, "Proxy-Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true,
	"Proxy-Authorization": true, "Te": true, "Trailer": true, "Transfer-Encoding": true, "Upgrade": true,
	"Cookie": true, "Origin": true, "Referer": true, "Accept-Encoding": true,
	"Forwarded": true, "X-Forwarded-For": true, "X-Forwarded-Host": true, "X-Forwarded-Proto": true, "X-Real-Ip": true,
}

// upstreamHeader copies the client's headers that go upstream (OpenAI-Beta,
// OpenAI-Organization, User-Agent, …).
func upstreamHeader(h *fasthttp.RequestHeader) http.Header {
	out := http.Header{}
	named := map[string]bool{}
	for _, t := range strings.Split(string(h.Peek("Connection")), ",") {
		named[http.CanonicalHeaderKey(strings.TrimSpace(t))] = true
	}
	for k, v := range h.All() {
		name := http.CanonicalHeaderKey(string(k))
		if notForwarded[name] || named[name] || strings.HasPrefix(name, "Sec-Websocket-") {
			continue
		}
		out.Add(name, string(v))
	}
	return out
}

// passedDown reports whether an upstream handshake response header reaches
// the client: the request id and OpenAI's own headers.
func passedDown(name string) bool {
	n := strings.ToLower(name)
	return n == "x-request-id" || strings.HasPrefix(n, "openai-") || strings.HasPrefix(n, "x-ratelimit-")
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
