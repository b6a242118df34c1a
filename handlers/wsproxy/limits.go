package wsproxy

import (
	"encoding/json"
	"errors"

	"github.com/fasthttp/websocket"
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
// is reported, out of the reservation, which is renewed when used up; a
// session whose budget cannot renew it is ended (cutOverBudget); what is
// left is given back when the session ends.

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

// charge prices one response's usage and charges it; s.mu is held. An
// error is the key's budget refusing more: the session must end.
func (s *session) charge(u usage.Usage, model string) error {
	if s.p.cfg.Gate == nil {
		return nil
	}
	if s.rec.Model != "" {
		model = s.rec.Model
	}
	cost := s.p.cfg.Gate.CostMicros(model, u.Priced())
	s.limits.cost += cost
	return s.limits.ticket.Charge(cost, u.TotalTokens)
}

// cutOverBudget ends a session whose key's budget is spent, after the
// response that spent it was delivered: the client gets an error event in
// the Realtime shape, then close 1008; upstream a normal close.
func (s *session) cutOverBudget(client *websocket.Conn, err error) {
	code, msg := "budget_exceeded", err.Error()
	var r *access.Refusal
	if errors.As(err, &r) {
		code = r.Code
	}
	ev, _ := json.Marshal(map[string]any{"type": "error", "error": map[string]any{
		"type": "insufficient_quota", "code": code, "message": msg}})
	_ = client.WriteMessage(websocket.TextMessage, ev)
	s.end(ending{code: websocket.ClosePolicyViolation, by: "proxy", outcome: models.OutcomeProxied, err: "the key's budget is spent",
		toClient:   &closeFrame{websocket.ClosePolicyViolation, "budget_exceeded"},
		toUpstream: &closeFrame{websocket.CloseNormalClosure, "budget exceeded"}})
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
