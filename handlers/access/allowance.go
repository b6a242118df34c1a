package access

import (
	"context"
	"sync"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// A replica takes requests from a key's rate bucket, and micro-dollars from
// its budget, in batches — one conditional statement per batch, not per
// request — and hands them out from memory; what requests use is written
// back in batches too. Nothing is admitted that the database did not
// grant, so limits hold across replicas exactly as with a statement per
// request. The price: what one replica holds unused the others cannot
// have until it is given back — a rate batch when it lapses (batchTTL), a
// budget slice once the replica's requests on the key are idle
// (sliceIdle). Batches are a fiftieth of the limit, so the others may be
// refused early by at most (replicas − 1) × limit/50, for at most a second;
// small limits (rpm < 100, budgets under 50 requests' estimates) still
// take a statement per request and have no such tolerance. Usage written
// back late (flushEvery) lets one replica overshoot TPM by what its
// requests use in that time.
const (
	batchShare = 50                     // a batch is limit/batchShare
	maxBatch   = 1000                   // requests in one rate batch
	batchTTL   = time.Second            // a rate batch lapses: unused requests go back
	sliceIdle  = time.Second            // an unused budget slice goes back after this
	flushEvery = 100 * time.Millisecond // usage and give-backs are written this often
)

// allowance is what this replica holds of one key's limits.
type allowance struct {
	mu sync.Mutex

	// Rate: requests taken from the bucket and not yet handed out.
	reqLeft   int64
	rateUntil time.Time        // the batch lapses
	rateOf    [2]int64         // the rpm and tpm it was taken for
	rate      models.RateState // the bucket after the last take
	tokens    int64            // used by settled requests, not yet written
	unused    int64            // requests to give back, not yet written

	// Budget: a slice per period (the previous one drains after midnight).
	slices []*slice
}

// slice is what the replica holds of a key's budget in one period.
type slice struct {
	period   time.Time
	held     int64 // reserved in the database for this replica
	inflight int64 // of held, estimates of requests not yet settled
	release  int64 // of held no longer needed, not yet written
	spent    int64 // actual costs, not yet written
	lastUse  time.Time
}

func (g *Gate) allowanceOf(id string) *allowance {
	if a, ok := g.allowances.Load(id); ok {
		return a.(*allowance)
	}
	a, _ := g.allowances.LoadOrStore(id, &allowance{})
	return a.(*allowance)
}

func batchOf(limit int64) int64 {
	return min(max(limit/batchShare, 1), maxBatch)
}

// takeRequest hands out one request of k's RPM/TPM from the batch held,
// taking a new batch when it is spent, lapsed or the tokens are known to
// be in debt. ok is false when the bucket refused; st is then its state.
// a.mu is held.
func (g *Gate) takeRequest(ctx context.Context, a *allowance, k *Key, now time.Time) (st models.RateState, ok bool, err error) {
	debt := k.tpm > 0 && a.rate.TokMicros-a.tokens*unit <= 0
	if a.reqLeft > 0 && now.Before(a.rateUntil) && !debt && a.rateOf == [2]int64{k.rpm, k.tpm} {
		a.reqLeft--
		return a.rateState(k), true, nil
	}
	// Write what is pending first, so the take sees this replica's usage.
	// (A batch taken under other limits is dropped: the bucket was reset.)
	if a.reqLeft > 0 && k.rpm > 0 && a.rateOf == [2]int64{k.rpm, k.tpm} {
		a.unused += a.reqLeft
	}
	a.reqLeft = 0
	if err := g.writeRate(ctx, k, a); err != nil {
		return st, false, err
	}
	n := int64(1)
	if k.rpm > 0 {
		n = batchOf(k.rpm)
	} else {
		n = maxBatch // no RPM: the batch only bounds how long TPM goes unchecked
	}
	st, granted, err := g.opts.Store.TakeRate(ctx, k.ID, k.rpm, k.tpm, now.UnixMilli(), n)
	if err != nil || granted == 0 {
		return st, false, err
	}
	a.rate, a.reqLeft, a.rateUntil, a.rateOf = st, granted-1, now.Add(batchTTL), [2]int64{k.rpm, k.tpm}
	return a.rateState(k), true, nil
}

// rateState is the bucket as this replica sees it: the database's, plus
// what it holds, minus the tokens it has not written yet.
func (a *allowance) rateState(k *Key) models.RateState {
	st := a.rate
	if k.rpm > 0 {
		st.ReqMicros += a.reqLeft * unit
	}
	st.TokMicros -= a.tokens * unit
	return st
}

// reserve holds estimate of k's budget in period from the slice held,
// reserving a new slice (estimate at least, budget/50 if it is left) when
// the slice runs short. It returns the slice, or nil and the state when
// the budget refused. a.mu is held.
func (g *Gate) reserve(ctx context.Context, a *allowance, k *Key, period time.Time, estimate int64, now time.Time) (*slice, models.BudgetState, error) {
	var s *slice
	for _, c := range a.slices {
		if c.period.Equal(period) {
			s = c
		}
	}
	if s == nil {
		s = &slice{period: period}
		a.slices = append(a.slices, s)
	}
	s.lastUse = now
	if free := s.held - s.inflight; free >= estimate && free > 0 {
		s.inflight += estimate
		return s, models.BudgetState{}, nil
	}
	if err := g.writeSlice(ctx, k, s); err != nil {
		return nil, models.BudgetState{}, err
	}
	free := s.held - s.inflight
	need := estimate - free
	want := max(need, k.budget/batchShare)
	st, granted, err := g.opts.Store.ReserveBudget(ctx, k.ID, period, max(need, 0), want, k.budget)
	if err != nil || granted == 0 {
		return nil, st, err
	}
	s.held += granted
	s.inflight += estimate
	return s, st, nil
}

// writeRate writes the tokens used and the requests given back; a.mu is held.
func (g *Gate) writeRate(ctx context.Context, k *Key, a *allowance) error {
	if a.tokens == 0 && a.unused == 0 {
		return nil
	}
	if err := g.opts.Store.SettleRate(ctx, k.ID, k.rpm, a.tokens, a.unused); err != nil {
		return err
	}
	a.tokens, a.unused = 0, 0
	return nil
}

// writeSlice writes what the slice gave back and spent; a.mu is held.
func (g *Gate) writeSlice(ctx context.Context, k *Key, s *slice) error {
	if s.release == 0 && s.spent == 0 {
		return nil
	}
	if err := g.opts.Store.SettleBudget(ctx, k.ID, s.period, s.release, s.spent); err != nil {
		return err
	}
	s.release, s.spent = 0, 0
	return nil
}

// flush writes every key's pending usage, gives back lapsed rate batches
// and idle budget slices (all of them when final), and forgets slices of
// past periods once drained. Writes happen outside the key's lock, so
// requests are never held up by them; a failed write is kept for the next.
func (g *Gate) flush(ctx context.Context, final bool) {
	now := g.opts.Now()
	failed := false
	g.allowances.Range(func(id, v any) bool {
		a, k := v.(*allowance), g.keyByID(id.(string))
		if k == nil {
			return true
		}
		type write struct {
			s              *slice
			release, spent int64
		}
		a.mu.Lock()
		if a.reqLeft > 0 && (final || !now.Before(a.rateUntil)) {
			if k.rpm > 0 {
				a.unused += a.reqLeft
			}
			a.reqLeft = 0
		}
		tokens, unused := a.tokens, a.unused
		a.tokens, a.unused = 0, 0
		var writes []write
		for _, s := range a.slices {
			if s.inflight == 0 && (final || now.Sub(s.lastUse) >= sliceIdle) {
				s.release += s.held
				s.held = 0
			}
			if s.release != 0 || s.spent != 0 {
				writes = append(writes, write{s, s.release, s.spent})
				s.release, s.spent = 0, 0
			}
		}
		a.mu.Unlock()

		var rateErr error
		if tokens != 0 || unused != 0 {
			rateErr = g.opts.Store.SettleRate(ctx, k.ID, k.rpm, tokens, unused)
		}
		errs := make([]error, len(writes))
		for i, w := range writes {
			errs[i] = g.opts.Store.SettleBudget(ctx, k.ID, w.s.period, w.release, w.spent)
		}

		a.mu.Lock()
		defer a.mu.Unlock()
		if rateErr != nil {
			a.tokens, a.unused = a.tokens+tokens, a.unused+unused
			failed = true
			g.warnOnce("client keys: writing rate usage failed; retrying", k, rateErr)
		}
		for i, w := range writes {
			if errs[i] != nil {
				w.s.release, w.s.spent = w.s.release+w.release, w.s.spent+w.spent
				failed = true
				g.warnOnce("client keys: writing budget usage failed; retrying", k, errs[i])
			}
		}
		keep := a.slices[:0]
		for _, s := range a.slices {
			if s.held > 0 || s.inflight > 0 || s.release != 0 || s.spent != 0 {
				keep = append(keep, s)
			}
		}
		a.slices = keep
		return true
	})
	if !failed {
		g.warned.Store(false)
	}
}

// keyByID finds a managed key in the table in force.
func (g *Gate) keyByID(id string) *Key {
	return g.table.Load().byID[id]
}

func (g *Gate) warnOnce(msg string, k *Key, err error) {
	if g.warned.CompareAndSwap(false, true) {
		g.opts.Logger.Warn(msg, "key", k.Name, "error", err.Error())
	}
}
