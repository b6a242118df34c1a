package proxy

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/tidwall/gjson"
	"github.com/valyala/fasthttp"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/handlers/access"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// ClientGate authenticates callers, by PROXY_API_KEYS and managed keys
// alike, and applies their limits; *access.Gate implements it.
type ClientGate interface {
	Authenticate(authorization []byte) (access.Caller, error)
	Admit(ctx context.Context, c access.Caller, r access.Request) (*access.Ticket, error)
	CostMicros(model string, u models.TokenUsage) int64
}

// admitLimits takes the caller's RPM, TPM and budget before forwarding
// (keyed replays never get here); a refusal carries its headers.
func (p *Proxy) admitLimits(c *fiber.Ctx, ex *exchange) error {
	t, err := p.gate.Admit(c.UserContext(), ex.caller, ex.ask)
	ex.ticket = t
	var r *access.Refusal
	if errors.As(err, &r) {
		for _, h := range r.RateLimitHead {
			c.Set(h.Name, h.Value)
		}
		if r.RetryAfter > 0 {
			c.Set(fiber.HeaderRetryAfter, strconv.FormatInt(int64((r.RetryAfter+time.Second-1)/time.Second), 10))
		}
	}
	return refusalError(err)
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
		return refusalError(err) // revoked or expired: say which
	}
	return errInvalidKey
}

// refusalError turns an access refusal into the APIError the client sees.
func refusalError(err error) error {
	var r *access.Refusal
	if !errors.As(err, &r) {
		return err
	}
	outcome := models.OutcomeRejected
	if r.Status == http.StatusUnauthorized {
		outcome = models.OutcomeUnauthorized
	}
	return &handlers.APIError{Status: r.Status, Type: r.Type, Code: r.Code, Message: r.Message, Outcome: outcome}
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
