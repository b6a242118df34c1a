package wsproxy

import (
	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/handlers/access"
	"github.com/openai-idempotent-proxy/proxy/handlers/usage"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// A session counts against its key's limits like a request: its start is
// one request for RPM and reserves a budget estimate (refused before the
// upgrade, in OpenAI's error shape, when the key is over a limit); each
// response's usage is charged against TPM and spent from the budget as it
// is reported; the reservation is given back when the session ends.

// limits is a session's hold on its caller's limits.
type limits struct {
	caller access.Caller
	ticket *access.Ticket // nil: no limits
	cost   int64          // micro-dollars so far
}

// authenticate names the caller, through the gate when there is one.
func (p *Proxy) authenticate(authorization []byte, s *session) (string, error) {
	if p.cfg.Gate == nil {
		return p.auth(authorization)
	}
	caller, err := p.cfg.Gate.Authenticate(authorization)
	s.limits.caller = caller
	return caller.Name, err
}

// admitLimits takes the session's request from RPM and its reservation
// from the budget, before upstream is contacted.
func (p *Proxy) admitLimits(c *fiber.Ctx, s *session) error {
	if p.cfg.Gate == nil {
		return nil
	}
	if err := s.limits.caller.Permits(s.rec.Model); err != nil {
		return handlers.LimitRefusal(c, err)
	}
	t, err := p.cfg.Gate.Admit(c.UserContext(), s.limits.caller, access.Request{Model: s.rec.Model})
	s.limits.ticket = t
	return handlers.LimitRefusal(c, err)
}

// charge prices one response's usage and charges it; s.mu is held.
func (s *session) charge(u usage.Usage, model string) {
	if s.p.cfg.Gate == nil {
		return
	}
	if s.rec.Model != "" {
		model = s.rec.Model
	}
	cost := s.p.cfg.Gate.CostMicros(model, models.TokenUsage{Input: u.PromptTokens, CachedInput: u.CachedTokens, Output: u.CompletionTokens})
	s.limits.cost += cost
	s.limits.ticket.Charge(cost, u.TotalTokens)
}

// settleLimits gives back the reservation once the session is over (or
// was refused), and puts its cost in the log row.
func (s *session) settleLimits() {
	s.mu.Lock()
	t := s.limits.ticket
	s.limits.ticket = nil
	s.rec.CostMicros = s.limits.cost
	s.mu.Unlock()
	t.Settle(0, 0) // already charged response by response
}
