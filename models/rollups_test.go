package models_test

import (
	"context"
	"errors"
	"math"
	"slices"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// at is base (10:00 UTC) plus minutes and seconds.
func at(min, sec int) time.Time {
	return base.Add(time.Duration(min)*time.Minute + time.Duration(sec)*time.Second)
}

// knownLogs is a small data set whose aggregates are worked out by hand in
// the tests below. Latencies sorted: 1 2 5 40 90 700 1500 30000.
func knownLogs() []models.RequestLog {
	return []models.RequestLog{
		// #1, #2: minute 10:00, 2xx, one replayed.
		{CreatedAt: at(0, 10), Client: "a", Model: "gpt-4o", Status: 200, Outcome: models.OutcomeProxied, DurationMs: 40,
			PromptTokens: 10, CompletionTokens: 20, TotalTokens: 30, RequestBytes: 100, ResponseBytes: 1000},
		{CreatedAt: at(0, 20), Client: "a", Model: "gpt-4o", Status: 200, Outcome: models.OutcomeReplayed, DurationMs: 5,
			PromptTokens: 10, CompletionTokens: 20, TotalTokens: 30, RequestBytes: 100, ResponseBytes: 1000},
		// #3: 502 for an upstream error: one error, not two.
		{CreatedAt: at(1, 5), Client: "b", Model: "gpt-4o-mini", Status: 502, Outcome: models.OutcomeUpstreamError, DurationMs: 1500,
			RequestBytes: 50, ResponseBytes: 80},
		// #4: cut off before any status: an error of class "other".
		{CreatedAt: at(1, 30), Client: "b", Model: "gpt-4o-mini", Status: 0, Outcome: models.OutcomeUpstreamError, DurationMs: 30000,
			RequestBytes: 50},
		// #5, #6: minute 10:02, 4xx from the idempotency layer.
		{CreatedAt: at(2, 0), Client: "a", Model: "gpt-4o-mini", Status: 409, Outcome: models.OutcomeIdempotencyConflict, DurationMs: 1,
			RequestBytes: 10, ResponseBytes: 20},
		{CreatedAt: at(2, 30), Client: "c", Model: "gpt-4o", Status: 422, Outcome: models.OutcomeIdempotencyMismatch, DurationMs: 2,
			RequestBytes: 10, ResponseBytes: 20},
		// #7: hour 11:00.
		{CreatedAt: at(61, 0), Client: "a", Model: "gpt-4o", Status: 200, Outcome: models.OutcomeProxied, DurationMs: 700,
			PromptTokens: 100, CompletionTokens: 200, TotalTokens: 300, RequestBytes: 1000, ResponseBytes: 5000},
		// #8: minute 12:05, a 3xx.
		{CreatedAt: at(125, 0), Client: "c", Model: "gpt-4o", Status: 304, Outcome: models.OutcomeProxied, DurationMs: 90,
			RequestBytes: 10, ResponseBytes: 0},
		// Outside [10:00, 13:00): before it, and exactly at its end.
		{CreatedAt: at(-5, 0), Client: "a", Model: "gpt-4o", Status: 200, DurationMs: 10, TotalTokens: 1000},
		{CreatedAt: at(180, 0), Client: "z", Model: "gpt-4o", Status: 500, DurationMs: 10, TotalTokens: 1000},
	}
}

func TestTotalsKnownAnswers(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		writeAll(t, s, knownLogs())
		got, err := s.Totals(context.Background(), at(0, 0), at(180, 0))
		if err != nil {
			t.Fatal(err)
		}
		want := models.Totals{
			Requests: 8, Errors: 2, ErrorRate: 0.25, Replays: 1, Conflicts: 1, Mismatches: 1,
			PromptTokens: 120, CompletionTokens: 240, TotalTokens: 360,
			RequestBytes: 1330, ResponseBytes: 7120,
			AvgLatencyMs: 32338.0 / 8,
			// Sorted: 1, 2, 5, 40, 90, 700, 1500, 30000 ms.
			// p50: the 4th, 40 ms, in (25, 50]; p95: the 8th, in (10000, 30000].
			P50: models.LatencyRange{Known: true, AboveMs: 25, UpToMs: 50},
			P95: models.LatencyRange{Known: true, AboveMs: 10000, UpToMs: 30000},
		}
		if !totalsEqual(got, want) {
			t.Errorf("Totals\n got %+v\nwant %+v", got, want)
		}
	})
}

func totalsEqual(a, b models.Totals) bool {
	near := func(x, y float64) bool { return math.Abs(x-y) < 1e-9 }
	if !near(a.ErrorRate, b.ErrorRate) || !near(a.AvgLatencyMs, b.AvgLatencyMs) {
		return false
	}
	a.ErrorRate, a.AvgLatencyMs = 0, 0
	b.ErrorRate, b.AvgLatencyMs = 0, 0
	return a == b
}

// TestTotalsWindows checks which minutes a window takes, including windows
// that mix hour roll-ups in the middle with minute roll-ups at the edges.
func TestTotalsWindows(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		writeAll(t, s, knownLogs())
		for _, tc := range []struct {
			name         string
			from, to     time.Time
			requests     int64
			totalTokens  int64
			errors       int64
			replaysCount int64
		}{
			{"three whole hours", at(0, 0), at(180, 0), 8, 360, 2, 1},
			{"minute edges around hour 11", at(1, 0), at(126, 0), 6, 300, 2, 0},            // #3-#8
			{"end excludes the minute starting at to", at(1, 0), at(125, 0), 5, 300, 2, 0}, // #3-#7
			{"within one hour", at(0, 30), at(59, 0), 4, 0, 2, 0},                          // #3-#6: minute 10:00 starts before from
			{"everything", at(-60, 0), at(240, 0), 10, 2360, 3, 1},
			{"whole days", at(-600, 0), at(840, 0), 10, 2360, 3, 1},               // 2025-03-10 00:00 to 03-11 00:00
			{"a day with ragged ends", at(-601, 30), at(841, 30), 10, 2360, 3, 1}, // 03-09 23:59:30 to 03-11 00:01:30
			{"empty", at(300, 0), at(400, 0), 0, 0, 0, 0},
		} {
			t.Run(tc.name, func(t *testing.T) {
				got, err := s.Totals(context.Background(), tc.from, tc.to)
				if err != nil {
					t.Fatal(err)
				}
				if got.Requests != tc.requests || got.TotalTokens != tc.totalTokens || got.Errors != tc.errors || got.Replays != tc.replaysCount {
					t.Errorf("requests %d tokens %d errors %d replays %d; want %d %d %d %d",
						got.Requests, got.TotalTokens, got.Errors, got.Replays, tc.requests, tc.totalTokens, tc.errors, tc.replaysCount)
				}
			})
		}
	})
}

func TestTraffic(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		writeAll(t, s, knownLogs())
		type P = models.TrafficPoint
		hourly := []P{
			{Time: at(0, 0), Requests: 6, Status2xx: 2, Status4xx: 2, Status5xx: 1, StatusOther: 1,
				PromptTokens: 20, CompletionTokens: 40, TotalTokens: 60},
			{Time: at(60, 0), Requests: 1, Status2xx: 1, PromptTokens: 100, CompletionTokens: 200, TotalTokens: 300},
			{Time: at(120, 0), Requests: 1, Status3xx: 1},
		}
		for _, tc := range []struct {
			name     string
			from, to time.Time
			step     time.Duration
			want     []P
		}{
			{"hourly", at(0, 0), at(180, 0), time.Hour, hourly},
			{"from rounded down to the step", at(10, 0), at(180, 0), time.Hour, hourly},
			{"minutes, empty ones zero", at(0, 0), at(4, 0), time.Minute, []P{
				{Time: at(0, 0), Requests: 2, Status2xx: 2, PromptTokens: 20, CompletionTokens: 40, TotalTokens: 60},
				{Time: at(1, 0), Requests: 2, Status5xx: 1, StatusOther: 1},
				{Time: at(2, 0), Requests: 2, Status4xx: 2},
				{Time: at(3, 0)},
			}},
			{"step rounded up to whole minutes", at(0, 0), at(3, 0), 90 * time.Second, []P{
				{Time: at(0, 0), Requests: 4, Status2xx: 2, Status5xx: 1, StatusOther: 1, PromptTokens: 20, CompletionTokens: 40, TotalTokens: 60},
				{Time: at(2, 0), Requests: 2, Status4xx: 2},
			}},
			{"a day: all ten", at(0, 0), at(840, 0), 24 * time.Hour, []P{
				{Time: at(-600, 0), Requests: 10, Status2xx: 4, Status3xx: 1, Status4xx: 2, Status5xx: 2, StatusOther: 1,
					PromptTokens: 120, CompletionTokens: 240, TotalTokens: 2360},
			}},
			{"30-minute steps read minute roll-ups", at(30, 0), at(150, 0), 30 * time.Minute, []P{
				{Time: at(30, 0)},
				{Time: at(60, 0), Requests: 1, Status2xx: 1, PromptTokens: 100, CompletionTokens: 200, TotalTokens: 300},
				{Time: at(90, 0)},
				{Time: at(120, 0), Requests: 1, Status3xx: 1},
			}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				got, err := s.Traffic(context.Background(), tc.from, tc.to, tc.step)
				if err != nil {
					t.Fatal(err)
				}
				if len(got) != len(tc.want) {
					t.Fatalf("%d points, want %d: %+v", len(got), len(tc.want), got)
				}
				for i := range got {
					if !got[i].Time.Equal(tc.want[i].Time) {
						t.Errorf("point %d at %v, want %v", i, got[i].Time, tc.want[i].Time)
					}
					got[i].Time = tc.want[i].Time
					if got[i] != tc.want[i] {
						t.Errorf("point %d\n got %+v\nwant %+v", i, got[i], tc.want[i])
					}
				}
			})
		}
		if _, err := s.Traffic(context.Background(), at(0, 0), at(0, 0).Add(30*24*time.Hour), time.Minute); !errors.Is(err, models.ErrInvalidFilter) {
			t.Errorf("43200 one-minute points: err %v, want ErrInvalidFilter", err)
		}
	})
}

func TestTopModelsAndClients(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		writeAll(t, s, knownLogs())
		ctx := context.Background()
		topModels, err := s.TopModels(ctx, at(0, 0), at(180, 0), 0)
		if err != nil {
			t.Fatal(err)
		}
		wantModels := []models.TopEntry{
			{Name: "gpt-4o", Requests: 5, Tokens: 360},
			{Name: "gpt-4o-mini", Requests: 3, Tokens: 0},
		}
		if !slices.Equal(topModels, wantModels) {
			t.Errorf("TopModels %+v, want %+v", topModels, wantModels)
		}
		clients, err := s.TopClients(ctx, at(0, 0), at(180, 0), 0)
		if err != nil {
			t.Fatal(err)
		}
		// b and c tie on requests; names break the tie.
		wantClients := []models.TopEntry{
			{Name: "a", Requests: 4, Tokens: 360},
			{Name: "b", Requests: 2, Tokens: 0},
			{Name: "c", Requests: 2, Tokens: 0},
		}
		if !slices.Equal(clients, wantClients) {
			t.Errorf("TopClients %+v, want %+v", clients, wantClients)
		}
		top1, err := s.TopClients(ctx, at(0, 0), at(180, 0), 1)
		if err != nil || !slices.Equal(top1, wantClients[:1]) {
			t.Errorf("TopClients limit 1: %+v, %v", top1, err)
		}
	})
}

func TestLatencyQuantile(t *testing.T) {
	bucket := func(bound int64) int { return slices.Index(models.LatencyBoundsMs[:], bound) }
	hist := func(counts map[int]int64) []int64 {
		h := make([]int64, len(models.LatencyBoundsMs)+1)
		for i, c := range counts {
			h[i] = c
		}
		return h
	}
	in := func(above, upTo int64) models.LatencyRange {
		return models.LatencyRange{Known: true, AboveMs: above, UpToMs: upTo}
	}
	overflow := len(models.LatencyBoundsMs)
	for _, tc := range []struct {
		name    string
		hist    []int64
		unsplit int64
		q       float64
		want    models.LatencyRange
	}{
		{"empty", hist(nil), 0, 0.5, models.LatencyRange{}},
		{"sub-millisecond", hist(map[int]int64{bucket(0): 100}), 0, 0.5, in(-1, 0)},
		// The bug this replaced: 1 ms requests read "25 ms p50".
		{"1 ms requests", hist(map[int]int64{bucket(1): 100}), 0, 0.5, in(0, 1)},
		{"p95 in the slow tail", hist(map[int]int64{bucket(1): 90, bucket(250): 10}), 0, 0.95, in(100, 250)},
		{"rank exactly at a bucket end", hist(map[int]int64{bucket(1): 1, bucket(2): 1}), 0, 0.5, in(0, 1)},
		{"overflow", hist(map[int]int64{overflow: 10}), 0, 0.95, in(120000, -1)},
		{"rows from before the fine buckets", hist(map[int]int64{bucket(1): 10}), 10, 0.5, in(-1, 50)},
		{"old rows below, rank above 50 ms", hist(map[int]int64{bucket(1000): 10}), 1, 0.95, in(500, 1000)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := models.LatencyQuantile(tc.hist, tc.unsplit, tc.q); got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}
