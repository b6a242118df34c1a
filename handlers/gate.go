package handlers

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/gofiber/fiber/v2"

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

// LimitRefusal sets the Retry-After and x-ratelimit-* headers of a refusal
// by the gate's Admit and returns the error to answer in OpenAI's shape;
// nil stays nil. The HTTP proxy and the WebSocket proxy (before upgrading)
// both answer with it.
func LimitRefusal(c *fiber.Ctx, err error) error {
	if err == nil {
		return nil // before errors.As, whose target escapes: every request passes here
	}
	var r *access.Refusal
	if errors.As(err, &r) {
		for _, h := range r.RateLimitHead {
			c.Set(h.Name, h.Value)
		}
		if r.RetryAfter > 0 {
			c.Set(fiber.HeaderRetryAfter, strconv.FormatInt(int64((r.RetryAfter+time.Second-1)/time.Second), 10))
		}
	}
	return RefusalError(err)
}

// RefusalError turns an access refusal into the APIError the client sees;
// other errors are returned as they are.
func RefusalError(err error) error {
	if err == nil {
		return nil // before errors.As, whose target escapes: every request passes here
	}
	var r *access.Refusal
	if !errors.As(err, &r) {
		return err
	}
	outcome := models.OutcomeRejected
	if r.Status == http.StatusUnauthorized {
		outcome = models.OutcomeUnauthorized
	}
	return &APIError{Status: r.Status, Type: r.Type, Code: r.Code, Message: r.Message, Outcome: outcome}
}
