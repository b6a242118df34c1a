package models_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// listRecord is the i-th of a data set where records come in pairs that
// share a created_at, so pages must break ties by id. Every third time is
// given in another zone: stored times must still sort as instants.
func listRecord(i int) models.RequestLog {
	statuses := []int{200, 201, 404, 500, 200, 429, 0}
	createdAt := base.Add(time.Duration(i/2) * time.Second)
	if i%3 == 0 {
		createdAt = createdAt.In(time.FixedZone("EST", -5*3600))
	}
	r := models.RequestLog{
		CreatedAt: createdAt,
		Client:    fmt.Sprintf("client-%d", i%4),
		Method:    "POST",
		Path:      []string{"/v1/chat/completions", "/v1/embeddings"}[i%2],
		Model:     fmt.Sprintf("model-%d", i%3),
		Status:    statuses[i%len(statuses)],
		Outcome:   []string{models.OutcomeProxied, models.OutcomeReplayed}[min(i%5, 1)],
	}
	if i%10 == 0 {
		r.IdempotencyKey = fmt.Sprintf("key-%d", i%30)
	}
	return r
}

func TestListRequestLogsKeyset(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		const n = 300
		recs := make([]models.RequestLog, n)
		for i := range recs {
			recs[i] = listRecord(i)
		}
		writeAll(t, s, recs)
		for _, tc := range []struct {
			name   string
			filter models.LogFilter
			match  func(models.RequestLog) bool
		}{
			{"all", models.LogFilter{}, func(models.RequestLog) bool { return true }},
			{"5xx", models.LogFilter{StatusClass: 5}, func(r models.RequestLog) bool { return r.Status >= 500 && r.Status < 600 }},
			{"2xx", models.LogFilter{StatusClass: 2}, func(r models.RequestLog) bool { return r.Status >= 200 && r.Status < 300 }},
			{"model", models.LogFilter{Model: "model-1"}, func(r models.RequestLog) bool { return r.Model == "model-1" }},
			{"path", models.LogFilter{Path: "/v1/embeddings"}, func(r models.RequestLog) bool { return r.Path == "/v1/embeddings" }},
			{"client and outcome", models.LogFilter{Client: "client-2", Outcome: models.OutcomeReplayed},
				func(r models.RequestLog) bool { return r.Client == "client-2" && r.Outcome == models.OutcomeReplayed }},
			{"idempotency key", models.LogFilter{IdempotencyKey: "key-10"}, func(r models.RequestLog) bool { return r.IdempotencyKey == "key-10" }},
			{"time range", models.LogFilter{From: base.Add(30 * time.Second), To: base.Add(100 * time.Second)},
				func(r models.RequestLog) bool {
					return !r.CreatedAt.Before(base.Add(30*time.Second)) && r.CreatedAt.Before(base.Add(100*time.Second))
				}},
			{"model, 4xx and time", models.LogFilter{Model: "model-2", StatusClass: 4, From: base.Add(20 * time.Second)},
				func(r models.RequestLog) bool {
					return r.Model == "model-2" && r.Status/100 == 4 && !r.CreatedAt.Before(base.Add(20*time.Second))
				}},
			{"no match", models.LogFilter{Model: "nope"}, func(models.RequestLog) bool { return false }},
		} {
			t.Run(tc.name, func(t *testing.T) {
				want := 0
				for _, r := range recs {
					if tc.match(r) {
						want++
					}
				}
				got := pageThrough(t, s, tc.filter, 7)
				if len(got) != want {
					t.Errorf("%d rows over all pages, want %d", len(got), want)
				}
				seen := map[int64]bool{}
				for i, r := range got {
					if seen[r.ID] {
						t.Fatalf("row %d listed twice", r.ID)
					}
					seen[r.ID] = true
					if !tc.match(r) {
						t.Errorf("row %d does not match the filter: %+v", r.ID, r)
					}
					if i > 0 && !newerFirst(got[i-1], r) {
						t.Errorf("rows %d then %d are not newest first", got[i-1].ID, r.ID)
					}
				}
			})
		}
	})
}

// pageThrough follows Next until the last page.
func pageThrough(t *testing.T, s *models.Store, f models.LogFilter, limit int) []models.RequestLog {
	t.Helper()
	var all []models.RequestLog
	f.Limit = limit
	for pages := 0; ; pages++ {
		if pages > 1000 {
			t.Fatal("pagination does not end")
		}
		page, err := s.ListRequestLogs(context.Background(), f)
		if err != nil {
			t.Fatal(err)
		}
		if len(page.Logs) > limit || (page.Next != "" && len(page.Logs) != limit) {
			t.Fatalf("page of %d rows with limit %d, next %q", len(page.Logs), limit, page.Next)
		}
		all = append(all, page.Logs...)
		if page.Next == "" {
			return all
		}
		f.Cursor = page.Next
	}
}

func newerFirst(a, b models.RequestLog) bool {
	return a.CreatedAt.After(b.CreatedAt) || (a.CreatedAt.Equal(b.CreatedAt) && a.ID > b.ID)
}

func TestListRequestLogsLimitsAndErrors(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		recs := make([]models.RequestLog, 250)
		for i := range recs {
			recs[i] = listRecord(i)
		}
		writeAll(t, s, recs)
		ctx := context.Background()
		for _, tc := range []struct {
			limit, want int
		}{{0, 50}, {-1, 50}, {10, 10}, {1000, 200}} {
			page, err := s.ListRequestLogs(ctx, models.LogFilter{Limit: tc.limit})
			if err != nil || len(page.Logs) != tc.want || page.Next == "" {
				t.Errorf("limit %d: %d rows, next %q, err %v; want %d rows and a next page", tc.limit, len(page.Logs), page.Next, err, tc.want)
			}
		}
		for _, f := range []models.LogFilter{{Cursor: "garbage"}, {Cursor: "12.x"}, {StatusClass: 1}, {StatusClass: 6}} {
			if _, err := s.ListRequestLogs(ctx, f); !errors.Is(err, models.ErrInvalidFilter) {
				t.Errorf("%+v: err %v, want ErrInvalidFilter", f, err)
			}
		}
	})
}

func TestRequestLogByID(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		want := listRecord(10)
		want.UserAgent, want.ClientIP, want.TTFBMs, want.Stream = "curl/8", "10.0.0.1", 42, true
		writeAll(t, s, []models.RequestLog{want})
		ctx := context.Background()
		page, err := s.ListRequestLogs(ctx, models.LogFilter{})
		if err != nil || len(page.Logs) != 1 {
			t.Fatalf("list: %v", err)
		}
		got, err := s.RequestLogByID(ctx, page.Logs[0].ID)
		if err != nil {
			t.Fatal(err)
		}
		want.ID = got.ID
		if !got.CreatedAt.Equal(want.CreatedAt) {
			t.Errorf("created_at %v, want %v", got.CreatedAt, want.CreatedAt)
		}
		got.CreatedAt = want.CreatedAt
		if got != want {
			t.Errorf("got  %+v\nwant %+v", got, want)
		}
		if _, err := s.RequestLogByID(ctx, got.ID+1); !errors.Is(err, models.ErrNotFound) {
			t.Errorf("missing id: err %v, want ErrNotFound", err)
		}
	})
}

func TestSweep(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		cutoff := at(-60, 0) // 09:00
		var recs []models.RequestLog
		rec := func(ts time.Time) models.RequestLog {
			return models.RequestLog{CreatedAt: ts, Client: "a", Model: "m", Status: 200, TotalTokens: 1}
		}
		for i := range 10 {
			recs = append(recs, rec(at(-120, i))) // 08:00:0i
		}
		recs = append(recs, rec(at(-61, 30))) // 08:59:30, still old
		recs = append(recs, rec(cutoff))      // exactly the cutoff: kept
		for i := range 5 {
			recs = append(recs, rec(at(-30, i))) // 09:30:0i
		}
		writeAll(t, s, recs)
		ctx := context.Background()

		n, err := s.SweepRequestLogs(ctx, cutoff, 3) // several rounds of 3
		if err != nil || n != 11 {
			t.Fatalf("swept %d logs, err %v; want 11", n, err)
		}
		var old int64
		s.DB().Table("request_logs").Where("created_at < ?", cutoff).Count(&old)
		if left := countRows(t, s, "request_logs"); left != 6 || old != 0 {
			t.Errorf("%d rows left (%d old), want 6 (0 old)", left, old)
		}
		if n, err := s.SweepRequestLogs(ctx, cutoff, 3); err != nil || n != 0 {
			t.Errorf("second sweep deleted %d, err %v", n, err)
		}

		// In each of the two scopes: minute rows 08:00, 08:59, 09:00, 09:30,
		// hour rows 08:00, 09:00 and the day row. The 08:00 and 08:59
		// minutes and the 08:00 hour end by 09:00; the day has not ended.
		n, err = s.SweepRollups(ctx, cutoff, 1)
		if err != nil || n != 2*3 {
			t.Fatalf("swept %d roll-ups, err %v; want 6", n, err)
		}
		if left := countRows(t, s, "request_rollups"); left != 2*4 {
			t.Errorf("%d roll-up rows left, want 8", left)
		}
		totals, err := s.Totals(ctx, at(-180, 0), at(0, 0))
		if err != nil || totals.Requests != 6 {
			t.Errorf("totals after the sweep: %d requests, err %v; want 6", totals.Requests, err)
		}
	})
}
