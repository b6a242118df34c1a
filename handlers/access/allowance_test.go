package access_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/handlers/access"
	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// counting passes everything to the real store and counts the statements
// that take from a limit.
type counting struct {
	*models.Store
	takes, reserves atomic.Int64
}

func (c *counting) TakeRate(ctx context.Context, id string, rpm, tpm, now, n int64) (models.RateState, int64, error) {
	c.takes.Add(1)
	return c.Store.TakeRate(ctx, id, rpm, tpm, now, n)
}

func (c *counting) ReserveBudget(ctx context.Context, id string, p time.Time, need, want, limit int64) (models.BudgetState, int64, error) {
	c.reserves.Add(1)
	return c.Store.ReserveBudget(ctx, id, p, need, want, limit)
}

// replicas are gates on one database, as on replicas of the proxy, with a
// clock the test moves.
func replicas(t *testing.T, s *models.Store, clock *testdb.Clock, limits models.ClientKeyLimits, n int) ([]*access.Gate, access.Caller, []*counting) {
	t.Helper()
	_, key, err := s.CreateClientKey(t.Context(), "limited", limits)
	if err != nil {
		t.Fatal(err)
	}
	var gates []*access.Gate
	var stores []*counting
	var caller access.Caller
	for range n {
		c := &counting{Store: s}
		g := access.New(t.Context(), access.Options{Store: c, Now: clock.Now, ReserveTokens: 1000})
		t.Cleanup(g.Close)
		if caller, err = g.Authenticate([]byte("Bearer " + key)); err != nil {
			t.Fatal(err)
		}
		gates, stores = append(gates, g), append(stores, c)
	}
	return gates, caller, stores
}

var start = time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)

// A high limit is taken in batches: a thousand requests, one statement.
func TestRateTakenInBatches(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		clock := testdb.NewClock(start)
		gates, caller, stores := replicas(t, s, clock, models.ClientKeyLimits{RPM: 100_000}, 1)
		for i := range 1000 {
			if _, err := gates[0].Admit(t.Context(), caller, access.Request{}); err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
		}
		if n := stores[0].takes.Load(); n != 1 {
			t.Fatalf("1,000 requests at rpm 100,000 took %d statements, want 1 batch", n)
		}
	})
}

// Two replicas taking batches from one bucket admit exactly the bucket:
// nothing beyond it, and nothing is lost while either holds requests.
func TestRateBatchesHoldAcrossReplicas(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		clock := testdb.NewClock(start) // still: the bucket does not refill
		gates, caller, _ := replicas(t, s, clock, models.ClientKeyLimits{RPM: 500}, 2)
		admitted := 0
		for i := 0; i < 2000; i++ {
			t1, err := gates[i%2].Admit(t.Context(), caller, access.Request{})
			if err == nil {
				admitted++
				t1.Settle(0, 0)
			}
		}
		if admitted != 500 {
			t.Fatalf("two replicas admitted %d requests from a bucket of 500", admitted)
		}

		// A batch held unused goes back once it lapses, for the other replica.
		clock.Advance(time.Minute) // a full bucket again
		for range 3 {
			if _, err := gates[0].Admit(t.Context(), caller, access.Request{}); err != nil {
				t.Fatal(err)
			}
		}
		// Replica 0 holds 7 of its batch of 10; the bucket has 490.
		for range 490 {
			if _, err := gates[1].Admit(t.Context(), caller, access.Request{}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := gates[1].Admit(t.Context(), caller, access.Request{}); err == nil {
			t.Fatal("replica 1 was admitted beyond the bucket while replica 0 holds the rest")
		}
		clock.Advance(1500 * time.Millisecond) // replica 0's batch lapses; 12 requests refill
		access.Flush(gates[0])
		got := 0
		for range 30 {
			if _, err := gates[1].Admit(t.Context(), caller, access.Request{}); err == nil {
				got++
			}
		}
		if got != 7+12 {
			t.Fatalf("after the lapse replica 1 got %d requests, want the 7 given back and the 12 refilled", got)
		}
	})
}

// Tokens used count at once on the replica that used them, before they
// are written: a key in TPM debt is refused without waiting for a flush.
func TestTokensCountBeforeTheyAreWritten(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		clock := testdb.NewClock(start)
		gates, caller, _ := replicas(t, s, clock, models.ClientKeyLimits{TPM: 1000}, 1)
		for i := range 2 {
			tk, err := gates[0].Admit(t.Context(), caller, access.Request{})
			if err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
			tk.Settle(0, 600)
		}
		_, err := gates[0].Admit(t.Context(), caller, access.Request{})
		if r, ok := err.(*access.Refusal); !ok || r.Code != "rate_limit_exceeded" {
			t.Fatalf("1,200 tokens used of 1,000 a minute, then: %v", err)
		}
	})
}

// Budget slices: replicas reserve a fiftieth of the budget at a time; what
// they admit never exceeds it, and once they are idle (or closed) every
// reservation is given back and the spend written is the sum of the costs.
func TestBudgetSlicesHoldAcrossReplicas(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		clock := testdb.NewClock(start)
		req := access.Request{Model: "gpt-4o-mini", MaxTokens: 1000} // $0.0006 at most
		est := models.DefaultPrices().CostMicros("gpt-4o-mini", models.TokenUsage{Output: 1000})
		budget := 500 * est
		gates, caller, stores := replicas(t, s, clock, models.ClientKeyLimits{BudgetMicros: budget, BudgetPeriod: models.PeriodDay}, 2)
		// Held in flight (none settled): exactly the budget's worth.
		var tickets []*access.Ticket
		for i := range 500 {
			tk, err := gates[i%2].Admit(t.Context(), caller, req)
			if err != nil {
				t.Fatalf("request %d of a budget for 500: %v", i, err)
			}
			tickets = append(tickets, tk)
		}
		if n := stores[0].reserves.Load() + stores[1].reserves.Load(); n > 50 {
			t.Fatalf("%d reserve statements for 500 admissions, want a slice of 10 at a time", n)
		}
		for i := range 100 {
			_, err := gates[i%2].Admit(t.Context(), caller, req)
			if r, ok := err.(*access.Refusal); !ok || r.Code != "budget_exceeded" {
				t.Fatalf("request %d beyond the budget: %v", 500+i, err)
			}
		}
		var cost int64
		for i, tk := range tickets {
			c := est / int64(2+i%3)
			cost += c
			tk.Settle(c, 0)
		}
		for _, g := range gates {
			g.Close()
		}
		st, err := s.Budget(t.Context(), caller.Key.ID, models.PeriodStart(models.PeriodDay, start))
		if err != nil {
			t.Fatal(err)
		}
		if st.ReservedMicros != 0 || st.SpentMicros != cost {
			t.Fatalf("after close: %+v, want nothing reserved and %d spent", st, cost)
		}
	})
}
