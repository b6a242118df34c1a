package models_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

func TestClientKeysStoreOnlyADigest(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		ctx := context.Background()
		k, key, err := s.CreateClientKey(ctx, "ci", models.ClientKeyLimits{RPM: 10, Models: []string{"gpt-4o"}})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(key, models.ClientKeyPrefix) || len(key) < 40 || k.Hint != key[len(key)-4:] {
			t.Fatalf("key %d chars, hint %q", len(key), k.Hint)
		}
		if _, _, err := s.CreateClientKey(ctx, "ci", models.ClientKeyLimits{}); !errors.Is(err, models.ErrNameTaken) {
			t.Fatalf("duplicate name: %v", err)
		}
		var n int64
		s.DB().Raw("SELECT COUNT(*) FROM client_keys WHERE digest = ? AND id = ?", models.DigestKey(key), k.ID).Scan(&n)
		if n != 1 {
			t.Fatal("digest not stored")
		}
		var dump string
		s.DB().Raw("SELECT id || name || digest || hint || models || notes FROM client_keys").Scan(&dump)
		if strings.Contains(dump, key) {
			t.Fatal("the key itself is in the database")
		}
		v1, _ := s.ClientKeysVersion(ctx)
		exp := time.Now().Add(time.Hour)
		up, err := s.UpdateClientKey(ctx, k.ID, models.ClientKeyLimits{ExpiresAt: &exp, TPM: 500})
		if err != nil || up.RPM != 0 || up.TPM != 500 || up.ExpiresAt == nil || up.Models != "" {
			t.Fatalf("update: %+v %v", up, err)
		}
		rv, err := s.RevokeClientKey(ctx, k.ID)
		if err != nil || rv.RevokedAt == nil || rv.State(time.Now()) != "revoked" {
			t.Fatalf("revoke: %+v %v", rv, err)
		}
		if v2, _ := s.ClientKeysVersion(ctx); v2 == v1 {
			t.Fatal("version did not move")
		}
		if _, err := s.RevokeClientKey(ctx, "ck_nope"); !errors.Is(err, models.ErrNotFound) {
			t.Fatalf("revoke unknown: %v", err)
		}
		// Revocation is final: its limits and expiry no longer change.
		if _, err := s.UpdateClientKey(ctx, k.ID, models.ClientKeyLimits{RPM: 9}); !errors.Is(err, models.ErrKeyRevoked) {
			t.Fatalf("update revoked: %v", err)
		}
		if _, err := s.UpdateClientKey(ctx, "ck_nope", models.ClientKeyLimits{RPM: 9}); !errors.Is(err, models.ErrNotFound) {
			t.Fatalf("update unknown: %v", err)
		}
		if got, _ := s.ClientKeyByID(ctx, k.ID); got.RPM != 0 || got.TPM != 500 {
			t.Fatalf("revoked key changed: %+v", got)
		}
	})
}

// TestBudgetReservationsNeverOverspend races 100 reservations of 10 against
// a budget of 250: exactly 25 succeed, and settling frees what was unused.
func TestBudgetReservationsNeverOverspend(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		ctx := context.Background()
		period := models.PeriodStart(models.PeriodDay, time.Now())
		var ok atomic.Int64
		var wg sync.WaitGroup
		for range 100 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, got, err := s.ReserveBudget(ctx, "k1", period, 10, 10, 250)
				if err != nil {
					t.Error(err)
				}
				if got == 10 {
					ok.Add(1)
				} else if got != 0 {
					t.Errorf("granted %d of 10", got)
				}
			}()
		}
		wg.Wait()
		if ok.Load() != 25 {
			t.Fatalf("%d reservations of 10 fit a budget of 250", ok.Load())
		}
		if err := s.SettleBudget(ctx, "k1", period, 10, 4); err != nil {
			t.Fatal(err)
		}
		st, _ := s.Budget(ctx, "k1", period)
		if st.SpentMicros != 4 || st.ReservedMicros != 240 {
			t.Fatalf("after settle: %+v", st)
		}
		if _, got, _ := s.ReserveBudget(ctx, "k1", period, 6, 6, 250); got != 6 {
			t.Fatal("the freed 6 cannot be reserved")
		}
		if st, got, _ := s.ReserveBudget(ctx, "k1", period, 0, 10, 250); got != 0 || st.SpentMicros != 4 {
			t.Fatalf("a zero estimate passed a full budget: %+v", st)
		}
	})
}

// A slice of a budget: as much of want as is left, never less than need.
func TestBudgetSlices(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		ctx := context.Background()
		period := models.PeriodStart(models.PeriodMonth, time.Now())
		for _, step := range []struct{ need, want, granted int64 }{
			{5, 40, 40}, // a new row: the whole slice
			{5, 40, 40}, // 80 held
			{5, 40, 20}, // 20 left: all of it
			{1, 40, 0},  // nothing left
		} {
			if _, got, err := s.ReserveBudget(ctx, "k", period, step.need, step.want, 100); err != nil || got != step.granted {
				t.Fatalf("reserve %d..%d: granted %d, want %d (%v)", step.need, step.want, got, step.granted, err)
			}
		}
		if err := s.SettleBudget(ctx, "k", period, 30, 0); err != nil { // 30 given back unused
			t.Fatal(err)
		}
		if _, got, _ := s.ReserveBudget(ctx, "k", period, 31, 40, 100); got != 0 {
			t.Fatalf("reserved %d when 30 was left and 31 needed", got)
		}
		if st, got, _ := s.ReserveBudget(ctx, "k", period, 10, 40, 100); got != 30 || st.ReservedMicros != 100 {
			t.Fatalf("granted %d (%+v), want the 30 left", got, st)
		}
	})
}

func TestRateBucketRefills(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		ctx := context.Background()
		now := int64(1_700_000_000_000)
		for i := range 3 {
			if _, got, err := s.TakeRate(ctx, "k", 3, 0, now, 1); got != 1 || err != nil {
				t.Fatalf("request %d refused: %v", i, err)
			}
		}
		if _, got, _ := s.TakeRate(ctx, "k", 3, 0, now, 1); got != 0 {
			t.Fatal("a fourth request passed rpm 3")
		}
		if _, got, _ := s.TakeRate(ctx, "k", 3, 0, now+20_000, 1); got != 1 {
			t.Fatal("20 s refill one request at rpm 3")
		}
		// A large limit: rpm * 1e6 must not overflow a 32-bit parameter.
		if _, got, err := s.TakeRate(ctx, "big", 1_000_000_000, 1_000_000_000, now, 1); got != 1 || err != nil {
			t.Fatalf("rpm 1e9 refused: %v", err)
		}
		// TPM: admitted while not in debt; tokens are charged afterwards.
		if _, got, _ := s.TakeRate(ctx, "t", 0, 100, now, 1); got != 1 {
			t.Fatal("tpm refused the first request")
		}
		if err := s.SettleRate(ctx, "t", 0, 150, 0); err != nil {
			t.Fatal(err)
		}
		if _, got, _ := s.TakeRate(ctx, "t", 0, 100, now+1000, 1); got != 0 {
			t.Fatal("tpm admitted a request while 50 tokens in debt")
		}
		if _, got, _ := s.TakeRate(ctx, "t", 0, 100, now+31_000, 1); got != 1 {
			t.Fatal("tpm still refuses after refilling")
		}
	})
}

// A batch takes as many requests as the bucket holds, up to n; requests
// given back return to it, never beyond a full bucket.
func TestRateBatches(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		ctx := context.Background()
		now := int64(1_700_000_000_000)
		for _, want := range []int64{4, 4, 2, 0} { // rpm 10
			if st, got, err := s.TakeRate(ctx, "k", 10, 0, now, 4); err != nil || got != want {
				t.Fatalf("batch of 4 granted %d (%+v), want %d (%v)", got, st, want, err)
			}
		}
		if err := s.SettleRate(ctx, "k", 10, 0, 3); err != nil { // 3 unused, given back
			t.Fatal(err)
		}
		if _, got, _ := s.TakeRate(ctx, "k", 10, 0, now, 4); got != 3 {
			t.Fatalf("granted %d after 3 were given back", got)
		}
		if err := s.SettleRate(ctx, "k", 10, 0, 50); err != nil { // more than a bucket
			t.Fatal(err)
		}
		if st, got, _ := s.TakeRate(ctx, "k", 10, 0, now, 100); got != 10 || st.ReqMicros != 0 {
			t.Fatalf("granted %d (%+v) from a bucket of 10", got, st)
		}
		// Without an rpm, the whole batch (the tpm is what is checked).
		if _, got, _ := s.TakeRate(ctx, "t", 0, 100, now, 500); got != 500 {
			t.Fatalf("tpm-only batch granted %d", got)
		}
		if _, got, _ := s.TakeRate(ctx, "t", 0, 100, now, 500); got != 500 {
			t.Fatalf("tpm-only second batch granted %d", got)
		}
	})
}

func TestCostOfKnownUsage(t *testing.T) {
	p := models.DefaultPrices()
	if p.Source == "" || p.Date == "" {
		t.Fatal("the price table names no source or date")
	}
	// gpt-4o-mini: $0.15 input, $0.075 cached input, $0.60 output per 1M.
	// 1,000,000 input of which 200,000 cached, 500,000 output:
	// 800,000*0.15 + 200,000*0.075 + 500,000*0.60 = 120,000 + 15,000 + 300,000 µ$.
	u := models.TokenUsage{Input: 1_000_000, CachedInput: 200_000, Output: 500_000}
	if got := p.CostMicros("gpt-4o-mini-2024-07-18", u); got != 435_000 {
		t.Fatalf("cost %d µ$, want 435000", got)
	}
	if got := p.CostMicros("no-such-model", u); got != 0 {
		t.Fatalf("unknown model costs %d", got)
	}
}
