package models_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

var idemEpoch = time.Date(2025, 5, 20, 9, 0, 0, 0, time.UTC)

// seedKeys stores n records; every three consecutive ones share created_at,
// so pages must break ties by id.
func seedKeys(t *testing.T, s *models.Store, n int) []models.IdempotencyRecord {
	t.Helper()
	states := []string{models.StateCompleted, models.StateCompleted, models.StateInProgress, models.StateReleased}
	recs := make([]models.IdempotencyRecord, n)
	for i := range recs {
		at := idemEpoch.Add(time.Duration(i/3) * time.Second)
		recs[i] = models.IdempotencyRecord{
			ID: fmt.Sprintf("%064x", i*7919%1000003), Client: fmt.Sprintf("client-%d", i%2), Method: "POST",
			Path: "/v1/chat/completions", IdemKey: fmt.Sprintf("key-%d", i%40), Fingerprint: "f",
			State: states[i%len(states)], LockedUntil: at, Status: 200, Headers: "{}",
			Body: []byte(`{"ok":true}`), BodySize: 11, Replayable: true, ReplayCount: i % 3,
			CreatedAt: at, UpdatedAt: at, ExpiresAt: at.Add(24 * time.Hour),
		}
	}
	if err := s.DB().CreateInBatches(recs, 100).Error; err != nil {
		t.Fatal(err)
	}
	return recs
}

func TestListIdempotencyKeyset(t *testing.T) {
	testdb.Each(t, func() time.Time { return idemEpoch.Add(time.Hour) }, func(t *testing.T, s *models.Store) {
		recs := seedKeys(t, s, 130)
		newestFirst := func(a, b models.IdempotencyRecord) int {
			if c := b.CreatedAt.Compare(a.CreatedAt); c != 0 {
				return c
			}
			switch {
			case a.ID > b.ID:
				return -1
			case a.ID < b.ID:
				return 1
			}
			return 0
		}
		for _, tc := range []struct {
			name   string
			filter models.IdempotencyFilter
			match  func(models.IdempotencyRecord) bool
		}{
			{"all", models.IdempotencyFilter{}, func(models.IdempotencyRecord) bool { return true }},
			{"completed", models.IdempotencyFilter{State: models.StateCompleted}, func(r models.IdempotencyRecord) bool { return r.State == models.StateCompleted }},
			{"released", models.IdempotencyFilter{State: models.StateReleased}, func(r models.IdempotencyRecord) bool { return r.State == models.StateReleased }},
			{"key", models.IdempotencyFilter{Key: "key-7"}, func(r models.IdempotencyRecord) bool { return r.IdemKey == "key-7" }},
			{"key and state", models.IdempotencyFilter{Key: "key-3", State: models.StateReleased},
				func(r models.IdempotencyRecord) bool { return r.IdemKey == "key-3" && r.State == models.StateReleased }},
			{"no match", models.IdempotencyFilter{Key: "nope"}, func(models.IdempotencyRecord) bool { return false }},
		} {
			t.Run(tc.name, func(t *testing.T) {
				var want []models.IdempotencyRecord
				for _, r := range recs {
					if tc.match(r) {
						want = append(want, r)
					}
				}
				slices.SortFunc(want, newestFirst)
				f := tc.filter
				f.Limit = 20
				var got []models.IdempotencyRecord
				for pages := 0; ; pages++ {
					if pages > 20 {
						t.Fatal("pagination does not end")
					}
					page, err := s.ListIdempotency(context.Background(), f)
					if err != nil {
						t.Fatal(err)
					}
					if len(page.Records) > 20 {
						t.Fatalf("page of %d", len(page.Records))
					}
					got = append(got, page.Records...)
					if page.Next == "" {
						break
					}
					f.Cursor = page.Next
				}
				if len(got) != len(want) {
					t.Fatalf("%d records, want %d", len(got), len(want))
				}
				for i := range got {
					if got[i].ID != want[i].ID {
						t.Fatalf("record %d is %s, want %s", i, got[i].ID, want[i].ID)
					}
					if got[i].Body != nil {
						t.Fatal("the list loaded bodies")
					}
					if !got[i].CreatedAt.Equal(want[i].CreatedAt) || !got[i].ExpiresAt.Equal(want[i].ExpiresAt) ||
						got[i].ExpiresAt.Location() != time.UTC || got[i].BodySize != 11 || got[i].ReplayCount != want[i].ReplayCount {
						t.Fatalf("record %d = %+v, want %+v", i, got[i], want[i])
					}
				}
			})
		}
	})
}

func TestListIdempotencyRejectsBadInput(t *testing.T) {
	testdb.Each(t, nil, func(t *testing.T, s *models.Store) {
		for _, f := range []models.IdempotencyFilter{
			{State: "bogus"}, {Cursor: "x"}, {Cursor: "123"}, {Cursor: "123.not-hex"}, {Cursor: "abc.00ff"},
		} {
			if _, err := s.ListIdempotency(context.Background(), f); !errors.Is(err, models.ErrInvalidFilter) {
				t.Errorf("%+v: err = %v, want ErrInvalidFilter", f, err)
			}
		}
		page, err := s.ListIdempotency(context.Background(), models.IdempotencyFilter{Limit: 10_000})
		if err != nil || len(page.Records) != 0 || page.Next != "" {
			t.Fatalf("empty table: %+v, %v", page, err)
		}
	})
}
