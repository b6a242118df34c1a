package models_test

import (
	"bytes"
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

// On PostgreSQL concurrent claims and completions share one statement
// (models/batcher.go). Within one batch each call keeps its own result: of
// two claims of one key the first wins, and a row PostgreSQL refuses fails
// only its own call.
func TestClaimBatchKeepsEachCallsOwnResult(t *testing.T) {
	s := testdb.Postgres(t, nil)
	if claimed, _, err := s.ClaimIdempotency(context.Background(), claimReq("held", "owner-held", "fp")); err != nil || !claimed {
		t.Fatalf("claim: %v, %v", claimed, err)
	}
	bad := claimReq("bad", "owner-bad", "fp")
	bad.Path = "/v1/\xff\x00" // not UTF-8: PostgreSQL refuses the row
	won, errs := s.ClaimBatch([]models.ClaimRequest{
		claimReq("b", "owner-b1", "fp"), claimReq("a", "owner-a", "fp"), bad, claimReq("b", "owner-b2", "fp"),
		claimReq("held", "owner-b1", "fp"), // the same owner as a winner, on a key held already
	})
	if !won[0] || errs[0] != nil || !won[1] || errs[1] != nil {
		t.Errorf("the first claim of b and the claim of a: won %v %v, errors %v %v; want both won", won[0], won[1], errs[0], errs[1])
	}
	if won[3] || errs[3] != nil {
		t.Errorf("the second claim of b: won %v, error %v; want lost to the first", won[3], errs[3])
	}
	if errs[2] == nil {
		t.Errorf("the refused row: won %v without an error", won[2])
	}
	if won[4] || errs[4] != nil {
		t.Errorf("the claim of a key held already: won %v, error %v; want lost", won[4], errs[4])
	}
	rec, err := s.IdempotencyByID(context.Background(), "id-b")
	if err != nil || rec.Owner != "owner-b1" {
		t.Fatalf("key b: %+v, %v; want held by owner-b1", rec, err)
	}
	if err := s.CompleteIdempotency(context.Background(), "id-b", "owner-b2", models.Completion{Status: 200}, time.Hour); !errors.Is(err, models.ErrLeaseLost) {
		t.Errorf("the loser's completion: %v, want ErrLeaseLost", err)
	}
	if err := s.CompleteIdempotency(context.Background(), "id-b", "owner-b1", models.Completion{Status: 200, Body: []byte("ok")}, time.Hour); err != nil {
		t.Errorf("the winner's completion: %v", err)
	}
}

// elapse lets d pass for the records: their times move d into the past.
// Lease arithmetic runs on the database's clock on PostgreSQL, which a
// fake Go clock cannot move.
func elapse(t *testing.T, s *models.Store, d time.Duration, ids ...string) {
	t.Helper()
	for _, id := range ids {
		rec, err := s.IdempotencyByID(context.Background(), id)
		if err != nil {
			t.Fatalf("elapse %s: %v", id, err)
		}
		err = s.DB().Model(&models.IdempotencyRecord{}).Where("id = ?", id).Updates(map[string]any{
			"locked_until": rec.LockedUntil.Add(-d), "created_at": rec.CreatedAt.Add(-d),
			"updated_at": rec.UpdatedAt.Add(-d), "expires_at": rec.ExpiresAt.Add(-d),
		}).Error
		if err != nil {
			t.Fatalf("elapse %s: %v", id, err)
		}
	}
}

func TestClaimLifecycle(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		ctx := context.Background()
		r := claimReq("k", "owner-1", "fp")
		r.Lease = 10 * time.Second

		if ok, _, err := s.ClaimIdempotency(ctx, r); !ok || err != nil {
			t.Fatalf("first claim: %v %v", ok, err)
		}
		// A live lease is not taken over, with or without renewal.
		elapse(t, s, 8*time.Second, r.ID)
		if err := s.RenewIdempotencyLease(ctx, r.ID, "owner-1", r.Lease); err != nil {
			t.Fatalf("renew: %v", err)
		}
		elapse(t, s, 8*time.Second, r.ID) // 16 s after the claim, 8 s after the renewal
		r2 := r
		r2.Owner = "owner-2"
		if ok, rec, _ := s.ClaimIdempotency(ctx, r2); ok || rec.State != models.StateInProgress {
			t.Fatal("taken over under a renewed lease")
		}
		// Once the lease lapses, another attempt takes over; the old owner lost it.
		elapse(t, s, 3*time.Second, r.ID)
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
		if err != nil || rec.State != models.StateCompleted || rec.BodySize != int64(len(body)) || rec.Attempts != 2 || !rec.Stream {
			t.Fatalf("stored record: %+v %v", rec, err)
		}
		if stored, err := s.IdempotencyBodyChunk(ctx, r.ID, rec.Attempts, 0, rec.BodySize); err != nil || string(stored) != string(body) {
			t.Fatalf("stored body %q %v", stored, err)
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
		elapse(t, s, time.Hour+time.Second, r.ID)
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
		if err := s.ReleaseIdempotency(ctx, r.ID, "owner-1", "upstream_status_503", time.Hour); err != nil {
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
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		ctx := context.Background()
		var ids []string
		for i := 0; i < 25; i++ {
			r := claimReq(fmt.Sprint("old-", i), "o", "fp")
			r.TTL = time.Minute
			_, _, _ = s.ClaimIdempotency(ctx, r)
			_ = s.CompleteIdempotency(ctx, r.ID, "o", models.Completion{Status: 200, Replayable: true}, time.Minute)
			ids = append(ids, r.ID)
		}
		running := claimReq("running", "o", "fp")
		running.TTL, running.Lease = time.Minute, time.Hour
		_, _, _ = s.ClaimIdempotency(ctx, running)
		fresh := claimReq("fresh", "o", "fp")
		_, _, _ = s.ClaimIdempotency(ctx, fresh)

		elapse(t, s, 2*time.Minute, append(ids, running.ID, fresh.ID)...)
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

// TestLiveLeaseSurvivesClockSkew: replicas whose clocks disagree by far
// more than the lease share one PostgreSQL. Lease and expiry arithmetic
// runs on the database's clock, so no replica takes over a live lease or
// sweeps a record early, whichever way its own clock is off.
func TestLiveLeaseSurvivesClockSkew(t *testing.T) {
	url := testdb.PostgresURL(t)
	open := func(skew time.Duration) *models.Store {
		s, err := models.Open(context.Background(), models.Options{DatabaseURL: url, Now: func() time.Time { return time.Now().Add(skew) }})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	}
	exact, ahead, behind := open(0), open(time.Hour), open(-time.Hour)
	ctx := context.Background()
	for _, tc := range []struct {
		name              string
		holder, challenge *models.Store
	}{
		{"challenger ahead", exact, ahead},
		{"holder behind", behind, exact},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := claimReq("skew-"+tc.name, "holder", "fp")
			r.TTL = 30 * time.Minute
			if ok, _, err := tc.holder.ClaimIdempotency(ctx, r); !ok || err != nil {
				t.Fatalf("holder claim: %v %v", ok, err)
			}
			r2 := r
			r2.Owner = "challenger"
			if ok, rec, err := tc.challenge.ClaimIdempotency(ctx, r2); ok || err != nil || rec.State != models.StateInProgress {
				t.Errorf("a live lease was taken over by a skewed replica: claimed=%v err=%v", ok, err)
			}
			if ok, _, err := tc.challenge.ClaimIdempotency(ctx, claimReq("skew-"+tc.name, "other", "other-fp")); ok || err != nil {
				t.Errorf("a live key was claimed for another body by a skewed replica: claimed=%v err=%v", ok, err)
			}
			if _, err := tc.challenge.SweepIdempotency(ctx, 100); err != nil {
				t.Fatal(err)
			}
			if err := tc.holder.CompleteIdempotency(ctx, r.ID, "holder", models.Completion{Status: 200, Replayable: true}, r.TTL); err != nil {
				t.Fatalf("holder complete: %v", err)
			}
			if _, err := tc.challenge.SweepIdempotency(ctx, 100); err != nil {
				t.Fatal(err)
			}
			if _, rec, err := tc.challenge.ClaimIdempotency(ctx, r2); err != nil || rec == nil || rec.State != models.StateCompleted {
				t.Errorf("the completed record is not replayed by a skewed replica: %+v %v", rec, err)
			}
		})
	}
}

// TestLiveLeaseOutlivesTheTTL: a call that runs longer than the TTL keeps
// its key; the TTL counts from the end of the attempt.
func TestLiveLeaseOutlivesTheTTL(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		ctx := context.Background()
		r := claimReq("long", "holder", "fp")
		r.TTL = time.Second
		if ok, _, err := s.ClaimIdempotency(ctx, r); !ok || err != nil {
			t.Fatalf("claim: %v %v", ok, err)
		}
		elapse(t, s, 5*time.Second, r.ID) // past the TTL, well within the 30 s lease
		for _, fp := range []string{"fp", "other-fp"} {
			if ok, rec, err := s.ClaimIdempotency(ctx, claimReq("long", "challenger", fp)); ok || err != nil || rec.State != models.StateInProgress {
				t.Fatalf("fingerprint %s: a live lease lost to an expired TTL: claimed=%v err=%v", fp, ok, err)
			}
		}
		if err := s.CompleteIdempotency(ctx, r.ID, "holder", models.Completion{Status: 200, Replayable: true}, r.TTL); err != nil {
			t.Fatalf("complete: %v", err)
		}
		if _, rec, err := s.ClaimIdempotency(ctx, claimReq("long", "challenger", "fp")); err != nil || rec == nil || rec.State != models.StateCompleted {
			t.Fatalf("completed record not replayed within its TTL: %+v %v", rec, err)
		}
	})
}

func TestIdempotencyBodyChunks(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		ctx := context.Background()
		body := make([]byte, 300_001)
		for i := range body {
			body[i] = byte(i * 7)
		}
		req := models.ClaimRequest{ID: "chunks", Client: "c", Method: "POST", Path: "/v1/x", Key: "k", Fingerprint: "f", Owner: "o1", Lease: time.Minute, TTL: time.Hour}
		if ok, _, err := s.ClaimIdempotency(ctx, req); !ok || err != nil {
			t.Fatalf("claim: %v %v", ok, err)
		}
		if err := s.CompleteIdempotency(ctx, "chunks", "o1", models.Completion{Status: 200, Headers: "{}", Body: body, BodySize: int64(len(body)), Replayable: true}, time.Hour); err != nil {
			t.Fatal(err)
		}
		_, rec, err := s.ClaimIdempotency(ctx, req)
		if err != nil || rec == nil || len(rec.Body) != 0 || rec.BodySize != int64(len(body)) {
			t.Fatalf("a claim that finds the record must not load its body: %v, %+v", err, rec)
		}
		var got []byte
		for off := int64(0); off < int64(len(body)); off += 65536 {
			chunk, err := s.IdempotencyBodyChunk(ctx, "chunks", rec.Attempts, off, 65536)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, chunk...)
		}
		if !bytes.Equal(got, body) {
			t.Fatalf("chunks reassemble to %d bytes, not the body", len(got))
		}
		if _, err := s.IdempotencyBodyChunk(ctx, "chunks", rec.Attempts+1, 0, 10); !errors.Is(err, models.ErrNotFound) {
			t.Errorf("chunk of another attempt: %v, want ErrNotFound", err)
		}
	})
}
