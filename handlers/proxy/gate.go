package proxy

import (
	"errors"

	"github.com/gofiber/fiber/v2"
	"github.com/tidwall/gjson"
	"github.com/valyala/fasthttp"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/handlers/access"
)

// admitLimits takes the caller's RPM, TPM and budget before forwarding
// (keyed replays never get here); a refusal carries its headers.
func (p *Proxy) admitLimits(c *fiber.Ctx, ex *exchange) error {
	t, err := p.gate.Admit(c.UserContext(), ex.caller, ex.ask)
	ex.ticket = t
	return handlers.LimitRefusal(c, err)
}

// setRateLimitHeaders shows the proxy's own limits in place of upstream's
// (which describe the upstream account, not this key).
func (ex *exchange) setRateLimitHeaders(h *fasthttp.ResponseHeader) {
	kvs := ex.ticket.Headers()
	if len(kvs) == 0 {
		return
	}
	for _, name := range rateLimitHeaders {
		h.Del(name)
	}
	for _, kv := range kvs {
		h.Set(kv.Name, kv.Value)
	}
}

var rateLimitHeaders = []string{
	"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
	"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
}

// keyError is the answer to a failed authentication.
func keyError(err error) error {
	var r *access.Refusal
	switch {
	case errors.Is(err, handlers.ErrNoKey):
		return errMissingKey
	case errors.As(err, &r):
		return handlers.RefusalError(err) // revoked or expired: say which
	}
	return handlers.ErrInvalidKey
}

// askOf is what limits need to know of a JSON request body.
func askOf(model string, body []byte, size int) access.Request {
	r := access.Request{Model: model, BodyBytes: int64(size)}
	for _, f := range [...]string{"max_completion_tokens", "max_tokens", "max_output_tokens"} {
		if v := gjson.GetBytes(body, f); v.Exists() {
			r.MaxTokens = v.Int()
			break
		}
	}
	return r
}
