package models_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

func claimReq(key, owner, fingerprint string) models.ClaimRequest {
	return models.ClaimRequest{ID: "id-" + key, Client: "alpha", Method: "POST", Path: "/v1/chat/completions", Key: key,
		Fingerprint: fingerprint, Owner: owner, Lease: 30 * time.Second, TTL: 24 * time.Hour}
}

func TestClaimHasExactlyOneWinner(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		ctx := context.Background()
		for trial := 0; trial < 5; trial++ {
			key := fmt.Sprintf("race-%d", trial)
			var winners atomic.Int32
			var wg sync.WaitGroup
			start := make(chan struct{})
			for i := 0; i < 32; i++ {
				wg.Add(1)
				go func(i int) {
					defer wg.Done()
					<-start
					claimed, existing, err := s.ClaimIdempotency(ctx, claimReq(key, fmt.Sprint("owner-", i), "fp"))
					if err != nil {
						t.Errorf("claim: %v", err)
						return
					}
					if claimed {
						winners.Add(1)
					} else if existing == nil || existing.State != models.StateInProgress {
						t.Errorf("loser saw %+v", existing)
					}
				}(i)
			}
			close(start)
			wg.Wait()
			if n := winners.Load(); n != 1 {
				t.Fatalf("trial %d: %d winners, want 1", trial, n)
			}
		}
	})
}

func TestClaimLifecycle(t *testing.T) {
	clock := testdb.NewClock(time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC))
	testdb.Each(t, clock.Now, func(t *testing.T, s *models.Store) {
		ctx := context.Background()
		r := claimReq("k", "owner-1", "fp")
		r.Lease = 10 * time.Second

		if ok, _, err := s.ClaimIdempotency(ctx, r); !ok || err != nil {
			t.Fatalf("first claim: %v %v", ok, err)
		}
		// A live lease is not taken over, with or without renewal.
		clock.Advance(8 * time.Second)
		if err := s.RenewIdempotencyLease(ctx, r.ID, "owner-1", r.Lease); err != nil {
			t.Fatalf("renew: %v", err)
		}
		clock.Advance(8 * time.Second) // 16 s after the claim, 8 s after the renewal
		r2 := r
		r2.Owner = "owner-2"
		if ok, rec, _ := s.ClaimIdempotency(ctx, r2); ok || rec.State != models.StateInProgress {
			t.Fatal("taken over under a renewed lease")
		}
		// Once the lease lapses, another attempt takes over; the old owner lost it.
		clock.Advance(3 * time.Second)
		if ok, displaced, err := s.ClaimIdempotency(ctx, r2); !ok || err != nil || displaced == nil {
			t.Fatalf("takeover after the lease lapsed: %v %v %v", ok, displaced, err)
		}
		if err := s.CompleteIdempotency(ctx, r.ID, "owner-1", models.Completion{Status: 200}, time.Hour); !errors.Is(err, models.ErrLeaseLost) {
			t.Fatalf("stale owner completed: %v", err)
		}
		if err := s.RenewIdempotencyLease(ctx, r.ID, "owner-1", r.Lease); !errors.Is(err, models.ErrLeaseLost) {
			t.Fatalf("stale owner renewed: %v", err)
		}
		body := []byte("data: {\"x\":1}\n\ndata: [DONE]\n\n")
		if err := s.CompleteIdempotency(ctx, r.ID, "owner-2", models.Completion{Status: 200, Headers: `{"Content-Type":"text/event-stream"}`, Body: body, BodySize: int64(len(body)), Stream: true, Replayable: true}, time.Hour); err != nil {
			t.Fatalf("complete: %v", err)
		}
		_, rec, err := s.ClaimIdempotency(ctx, r)
		if err != nil || rec.State != models.StateCompleted || string(rec.Body) != string(body) || rec.Attempts != 2 || !rec.Stream {
			t.Fatalf("stored record: %+v %v", rec, err)
		}
		if err := s.MarkIdempotencyReplayed(ctx, r.ID); err != nil {
			t.Fatal(err)
		}
		got, _ := s.IdempotencyByID(ctx, r.ID)
		if got.ReplayCount != 1 || got.LastReplayAt == nil {
			t.Fatalf("replay not counted: %+v", got)
		}
		// TTL: an expired record is never replayed; the key is new again,
		// even with another body.
		clock.Advance(time.Hour + time.Second)
		r3 := claimReq("k", "owner-3", "another-fp")
		if ok, _, err := s.ClaimIdempotency(ctx, r3); !ok || err != nil {
			t.Fatalf("claim after expiry: %v %v", ok, err)
		}
	})
}

func TestReleaseLetsTheRetryExecute(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		ctx := context.Background()
		r := claimReq("rel", "owner-1", "fp")
		if ok, _, _ := s.ClaimIdempotency(ctx, r); !ok {
			t.Fatal("claim")
		}
		if err := s.ReleaseIdempotency(ctx, r.ID, "owner-1", "upstream_status_503"); err != nil {
			t.Fatal(err)
		}
		other := r
		other.Fingerprint, other.Owner = "different", "owner-x"
		if ok, rec, _ := s.ClaimIdempotency(ctx, other); ok || rec.ReleaseReason != "upstream_status_503" {
			t.Fatalf("a different request took over a released key: %v %+v", ok, rec)
		}
		r.Owner = "owner-2"
		if ok, _, err := s.ClaimIdempotency(ctx, r); !ok || err != nil {
			t.Fatalf("retry after release: %v %v", ok, err)
		}
	})
}

func TestSweepDeletesOnlyExpired(t *testing.T) {
	clock := testdb.NewClock(time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC))
	testdb.Each(t, clock.Now, func(t *testing.T, s *models.Store) {
		ctx := context.Background()
		for i := 0; i < 25; i++ {
			r := claimReq(fmt.Sprint("old-", i), "o", "fp")
			r.TTL = time.Minute
			_, _, _ = s.ClaimIdempotency(ctx, r)
			_ = s.CompleteIdempotency(ctx, r.ID, "o", models.Completion{Status: 200, Replayable: true}, time.Minute)
		}
		running := claimReq("running", "o", "fp")
		running.TTL, running.Lease = time.Minute, time.Hour
		_, _, _ = s.ClaimIdempotency(ctx, running)
		fresh := claimReq("fresh", "o", "fp")
		_, _, _ = s.ClaimIdempotency(ctx, fresh)

		clock.Advance(2 * time.Minute)
		n, err := s.SweepIdempotency(ctx, 10) // several batches
		if err != nil || n != 25 {
			t.Fatalf("swept %d (%v), want 25", n, err)
		}
		for _, id := range []string{running.ID, fresh.ID} {
			if _, err := s.IdempotencyByID(ctx, id); err != nil {
				t.Fatalf("%s swept: %v", id, err)
			}
		}
		if err := s.DeleteIdempotency(ctx, fresh.ID); err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteIdempotency(ctx, fresh.ID); !errors.Is(err, models.ErrNotFound) {
			t.Fatalf("second delete: %v", err)
		}
	})
}
