package proxy

import (
	"errors"
	"slices"

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

// requestFields is what admission reads of a JSON request body.
type requestFields struct {
	model, duplicate string // duplicate: a field below sent twice
	stream           bool
	maxTokens        int64 // max_completion_tokens, else max_tokens, else max_output_tokens
}

// inspectedFields are the fields admission reads, in order of precedence
// from the third on (the output bounds).
var inspectedFields = [...]string{"model", "stream", "max_completion_tokens", "max_tokens", "max_output_tokens"}

// inspectBody reads the fields admission needs in one pass over the body's
// top level. A field sent twice is reported, not chosen: JSON parsers
// differ on which copy counts (gjson takes the first, most decoders the
// last), and the proxy must judge the request upstream will run.
func inspectBody(body []byte) requestFields {
	var f requestFields
	var seen [len(inspectedFields)]bool
	var bounds [len(inspectedFields) - 2]gjson.Result
	gjson.ParseBytes(body).ForEach(func(k, v gjson.Result) bool {
		i := slices.Index(inspectedFields[:], k.Str)
		switch {
		case i < 0:
			return true
		case seen[i]:
			f.duplicate = k.Str
			return false
		}
		seen[i] = true
		switch i {
		case 0:
			f.model = v.String()
		case 1:
			f.stream = v.Bool()
		default:
			bounds[i-2] = v
		}
		return true
	})
	for _, b := range bounds {
		if b.Exists() {
			f.maxTokens = b.Int()
			break
		}
	}
	return f
}
