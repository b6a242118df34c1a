package access

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// Refusal is a request the gate turns away, in the terms of OpenAI's error
// body; handlers answer it as such.
type Refusal struct {
	Status        int
	Type, Code    string
	Message       string
	RetryAfter    time.Duration // 0: no Retry-After
	RateLimitHead []Header      // x-ratelimit-* to send with it
}

func (r *Refusal) Error() string { return r.Message }

// Header is one response header.
type Header struct{ Name, Value string }

var (
	errRevoked = &Refusal{Status: 401, Type: "invalid_request_error", Code: "revoked_api_key",
		Message: "This proxy API key has been revoked."}
	errExpired = &Refusal{Status: 401, Type: "invalid_request_error", Code: "expired_api_key",
		Message: "This proxy API key has expired."}
	errLimitsUnavailable = &Refusal{Status: 503, Type: "server_error", Code: "limits_unavailable", RetryAfter: time.Second,
		Message: "The proxy cannot check this key's limits right now (its database does not answer). Retry shortly."}
)

// Request is what admission knows of a request before it is forwarded.
type Request struct {
	Model     string
	MaxTokens int64 // max_tokens, max_completion_tokens or max_output_tokens; 0: not given
	BodyBytes int64 // request body size; -1: unknown
}

// Ticket is an admitted request's hold on its key's limits, given back by
// Settle with what the request actually used. A nil *Ticket holds nothing.
type Ticket struct {
	g        *Gate
	key      *Key
	al       *allowance
	rated    bool     // took a request from RPM/TPM
	headers  []Header // x-ratelimit-* as of admission
	slice    *slice   // nil: no budget
	reserved int64    // micro-dollars held in slice
	estimate int64    // what it reserved at admission
	settled  bool
}

// Admit checks and takes the caller's RPM, TPM and budget before the
// request is forwarded, from what this replica holds of them (see
// allowance.go): most requests pass without a database round trip, and
// callers without limits always do. Replays never come here: they cost
// nothing.
func (g *Gate) Admit(ctx context.Context, c Caller, r Request) (*Ticket, error) {
	if !c.Limited() || g.opts.Store == nil {
		return nil, nil
	}
	k := c.Key
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	a := g.allowanceOf(k.ID)
	t := &Ticket{g: g, key: k, al: a}
	now := g.opts.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if k.rpm > 0 || k.tpm > 0 {
		st, ok, err := g.takeRequest(ctx, a, k, now)
		if err != nil {
			g.opts.Logger.Warn("client keys: rate check failed", "key", k.Name, "error", err.Error())
			return nil, errLimitsUnavailable
		}
		if !ok {
			return nil, k.rateRefusal(st)
		}
		t.rated, t.headers = true, k.rateHeaders(st)
	}
	if k.budget > 0 {
		period := models.PeriodStart(k.budgetPeriod, now)
		estimate := g.estimate(r)
		s, st, err := g.reserve(ctx, a, k, period, estimate, now)
		if s == nil {
			if t.rated && k.rpm > 0 {
				a.reqLeft++ // the request taken is not used
			}
			if err != nil {
				g.opts.Logger.Warn("client keys: budget check failed", "key", k.Name, "error", err.Error())
				return nil, errLimitsUnavailable
			}
			return nil, k.budgetRefusal(st, estimate, period)
		}
		t.slice, t.reserved, t.estimate = s, estimate, estimate
	}
	return t, nil
}

// estimate is the most a request is expected to cost: its body as input
// tokens (about 4 bytes a token, an overestimate for JSON) and its
// max_tokens, or ReserveTokens, as output, at its model's price.
func (g *Gate) estimate(r Request) int64 {
	out := r.MaxTokens
	if out <= 0 {
		out = g.opts.ReserveTokens
	}
	in := max(r.BodyBytes, 0) / 4
	return g.opts.Prices.CostMicros(r.Model, models.TokenUsage{Input: in, Output: out})
}

// Headers are the x-ratelimit-* headers of an admitted request, the way
// OpenAI sends them; nil without RPM or TPM.
func (t *Ticket) Headers() []Header {
	if t == nil {
		return nil
	}
	return t.headers
}

// Settle gives back what the ticket holds: the budget reservation becomes
// the actual cost, and the actual tokens count against TPM. It is counted
// in memory and written with the next flush; it runs once.
func (t *Ticket) Settle(costMicros, tokens int64) {
	if t == nil || t.settled {
		return
	}
	t.settled = true
	t.al.mu.Lock()
	defer t.al.mu.Unlock()
	t.charge(t.reserved, costMicros, tokens)
}

// Charge counts usage known before the ticket is settled — a response
// within a WebSocket session — as spent and against TPM. The cost is spent
// out of the reservation; once that is used up, another estimate's worth
// is reserved, and if the budget has no more, Charge returns the refusal:
// the session must end. Not safe for concurrent use with Settle.
func (t *Ticket) Charge(costMicros, tokens int64) error {
	if t == nil || t.settled || (costMicros <= 0 && tokens <= 0) {
		return nil
	}
	a := t.al
	a.mu.Lock()
	defer a.mu.Unlock()
	t.charge(min(max(costMicros, 0), t.reserved), costMicros, tokens)
	if t.slice == nil || t.reserved > 0 {
		return nil
	}
	k, now := t.key, t.g.opts.Now()
	period := models.PeriodStart(k.budgetPeriod, now)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s, st, err := t.g.reserve(ctx, a, k, period, t.estimate, now)
	if err != nil {
		return nil // the database is down: the session goes on, charged
	}
	if s == nil {
		return k.budgetRefusal(st, t.estimate, period)
	}
	t.slice, t.reserved = s, t.estimate
	return nil
}

// charge moves reserved of the reservation to spent as costMicros and
// counts tokens against TPM; a.mu is held.
func (t *Ticket) charge(reserved, costMicros, tokens int64) {
	if s := t.slice; s != nil {
		s.inflight -= reserved
		s.held -= reserved
		s.release += reserved
		s.spent += costMicros
		t.reserved -= reserved
	}
	if t.rated && t.key.tpm > 0 && tokens > 0 {
		t.al.tokens += tokens
	}
}

const unit = 1_000_000 // the fixed-point scale of the rate buckets

// refill is how long a bucket of limit per minute takes to earn micros.
func refill(limit, micros int64) time.Duration {
	if limit <= 0 || micros <= 0 {
		return 0
	}
	// limit per minute = limit*1e6 micros per 60,000 ms.
	ms := (micros*60 + limit*1000 - 1) / (limit * 1000)
	return time.Duration(ms) * time.Millisecond
}

func (k *Key) rateHeaders(st models.RateState) []Header {
	var h []Header
	if k.rpm > 0 {
		h = append(h,
			Header{"x-ratelimit-limit-requests", strconv.FormatInt(k.rpm, 10)},
			Header{"x-ratelimit-remaining-requests", strconv.FormatInt(max(0, st.ReqMicros/unit), 10)},
			Header{"x-ratelimit-reset-requests", refill(k.rpm, k.rpm*unit-st.ReqMicros).String()})
	}
	if k.tpm > 0 {
		h = append(h,
			Header{"x-ratelimit-limit-tokens", strconv.FormatInt(k.tpm, 10)},
			Header{"x-ratelimit-remaining-tokens", strconv.FormatInt(max(0, st.TokMicros/unit), 10)},
			Header{"x-ratelimit-reset-tokens", refill(k.tpm, k.tpm*unit-st.TokMicros).String()})
	}
	return h
}

func (k *Key) rateRefusal(st models.RateState) *Refusal {
	r := &Refusal{Status: 429, Code: "rate_limit_exceeded", RateLimitHead: k.rateHeaders(st)}
	if k.rpm > 0 && st.ReqMicros < unit {
		r.Type = "requests"
		r.RetryAfter = refill(k.rpm, unit-st.ReqMicros)
		r.Message = fmt.Sprintf("Rate limit reached for this proxy key: %d requests per minute. Please try again in %s.", k.rpm, r.RetryAfter)
	} else {
		r.Type = "tokens"
		r.RetryAfter = refill(k.tpm, 1-st.TokMicros)
		r.Message = fmt.Sprintf("Rate limit reached for this proxy key: %d tokens per minute. Please try again in %s.", k.tpm, r.RetryAfter)
	}
	return r
}

func (k *Key) budgetRefusal(st models.BudgetState, estimate int64, period time.Time) *Refusal {
	r := &Refusal{Status: 429, Type: "insufficient_quota", Code: "budget_exceeded"}
	end := models.PeriodEnd(k.budgetPeriod, period)
	switch {
	case st.SpentMicros >= k.budget:
		r.RetryAfter = time.Until(end)
		r.Message = fmt.Sprintf("This proxy key's %s budget of $%s is spent; it renews at %s UTC.",
			budgetWord(k.budgetPeriod), USD(k.budget), end.Format("2006-01-02 15:04"))
	case estimate > k.budget-st.SpentMicros:
		r.RetryAfter = time.Until(end)
		r.Message = fmt.Sprintf("This request could cost up to $%s, more than is left of this proxy key's %s budget ($%s). Lower max_tokens or wait until %s UTC.",
			USD(estimate), budgetWord(k.budgetPeriod), USD(k.budget-st.SpentMicros), end.Format("2006-01-02 15:04"))
	default:
		// Requests in flight hold the rest; they give back what they do not use.
		r.RetryAfter = time.Second
		r.Message = fmt.Sprintf("This proxy key's %s budget of $%s is held by requests in flight. Please try again shortly.",
			budgetWord(k.budgetPeriod), USD(k.budget))
	}
	return r
}

func budgetWord(period string) string {
	if period == models.PeriodMonth {
		return "monthly"
	}
	return "daily"
}

// USD formats micro-dollars as dollars with up to 6 decimals.
func USD(micros int64) string {
	s := strconv.FormatFloat(float64(micros)/unit, 'f', 6, 64)
	for len(s) > 4 && s[len(s)-1] == '0' && s[len(s)-4] != '.' {
		s = s[:len(s)-1]
	}
	return s
}
