package models

import (
	"context"
	"fmt"
	"math"
	"strings"
	"time"
)

// The query side of the roll-ups: windows covered by the coarsest buckets
// that fit, and the dashboard's charts, totals and top-N tables.

// bucketRange is the roll-up rows of one span with bucket in [from, to).
type bucketRange struct{ span, from, to int64 }

// cover splits [from, to) (unix seconds) into bucket ranges, coarsest span
// first: whole days in the middle, whole hours beside them, and minutes at
// the ragged ends. Together they count exactly the minutes that start in
// [from, to). A 7-day window thus reads about 6 day, 46 hour and 118
// minute buckets instead of 10,080 minute buckets.
func cover(from, to int64, spans []int64) []bucketRange {
	if from >= to {
		return nil
	}
	span := spans[0]
	if len(spans) == 1 {
		return []bucketRange{{span, from, to}} // the finest grain: no whole-bucket rounding
	}
	first := floorDiv(from+span-1, span) * span // first bucket wholly inside
	end := floorDiv(to, span) * span            // end of the last one
	if first >= end {
		return cover(from, to, spans[1:])
	}
	out := cover(from, first, spans[1:])
	out = append(out, bucketRange{span, first, end})
	return append(out, cover(end, to, spans[1:])...)
}

// window is the WHERE clause selecting the rows of scope that cover
// [from, to), reading only the given spans (coarsest first, ending with
// minutes).
func window(scope int, from, to time.Time, spans []int64) (string, []any) {
	ranges := cover(from.Unix(), to.Unix(), spans)
	if len(ranges) == 0 {
		return "1 = 0", nil
	}
	conds := make([]string, len(ranges))
	args := []any{scope}
	for i, r := range ranges {
		conds[i] = "(span = ? AND bucket >= ? AND bucket < ?)"
		args = append(args, r.span, r.from, r.to)
	}
	return "scope = ? AND (" + strings.Join(conds, " OR ") + ")", args
}

// sumColumns is "SUM(requests), SUM(prompt_tokens), …" in counter order.
func sumColumns() string {
	sums := make([]string, len(counterColumns))
	for i, col := range counterColumns {
		sums[i] = "SUM(" + col + ")"
	}
	return strings.Join(sums, ", ")
}

// TrafficPoint is one step of the traffic chart.
type TrafficPoint struct {
	Time                 time.Time // start of the step, UTC
	Requests             int64
	Status2xx, Status3xx int64
	Status4xx, Status5xx int64
	StatusOther          int64 // requests that never got a status (cut off, cancelled)
	PromptTokens         int64
	CompletionTokens     int64
	TotalTokens          int64
	CostMicros           int64 // spend, USD x 1e6
}

// maxTrafficPoints bounds a chart so a tiny step over a long window cannot
// build millions of points.
const maxTrafficPoints = 10_000

// Traffic returns one point per step from from to to, zeros where nothing
// happened, read from the roll-ups. step is rounded up to whole minutes (the
// roll-up grain) and from is rounded down to a multiple of step, so points
// sit on round times (whole hours for a 1h step, in UTC).
func (s *Store) Traffic(ctx context.Context, from, to time.Time, step time.Duration) ([]TrafficPoint, error) {
	step = max(time.Minute, (step + time.Minute - 1).Truncate(time.Minute))
	from, to = from.UTC().Truncate(step), to.UTC()
	n := int((to.Sub(from) + step - 1) / step)
	if n <= 0 || n > maxTrafficPoints {
		return nil, fmt.Errorf("models: traffic: %d points from %s to %s: %w", n, from, to, ErrInvalidFilter)
	}
	points := make([]TrafficPoint, n)
	for i := range points {
		points[i].Time = from.Add(time.Duration(i) * step)
	}
	// A bucket fits in one step only if its span divides the step; from is
	// then aligned to it too, by the truncation above.
	var spans []int64
	for _, span := range rollupSpans {
		if step%(time.Duration(span)*time.Second) == 0 {
			spans = append(spans, span)
		}
	}
	where, args := window(scopeTotal, from, to, spans)
	stepSec := int64(step / time.Second)
	rows, err := s.db.WithContext(ctx).Raw(
		"SELECT (bucket - ?) / ? AS slot, status_class, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(total_tokens), SUM(cost_micros)"+
			" FROM request_rollups WHERE "+where+" GROUP BY slot, status_class",
		append([]any{from.Unix(), stepSec}, args...)...).Rows()
	if err != nil {
		return nil, fmt.Errorf("models: traffic: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var slot, class, requests, prompt, completion, total, cost int64
		if err := rows.Scan(&slot, &class, &requests, &prompt, &completion, &total, &cost); err != nil {
			return nil, fmt.Errorf("models: traffic: %w", err)
		}
		if slot < 0 || slot >= int64(n) {
			continue // cannot happen with the window above; never index out of range
		}
		p := &points[slot]
		p.Requests += requests
		*p.classCounter(int(class)) += requests
		p.PromptTokens += prompt
		p.CompletionTokens += completion
		p.TotalTokens += total
		p.CostMicros += cost
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("models: traffic: %w", err)
	}
	return points, nil
}

func (p *TrafficPoint) classCounter(class int) *int64 {
	switch class {
	case 2:
		return &p.Status2xx
	case 3:
		return &p.Status3xx
	case 4:
		return &p.Status4xx
	case 5:
		return &p.Status5xx
	}
	return &p.StatusOther
}

// Totals summarises a window for the dashboard's headline numbers.
type Totals struct {
	Requests int64
	// Errors counts 5xx answers plus upstream errors that got no 5xx (a
	// request cut off mid-stream keeps its 200); each request counts once.
	Errors     int64
	ErrorRate  float64 // Errors / Requests; 0 without requests
	Replays    int64   // answered from a stored idempotency record
	Conflicts  int64   // 409: same key still in progress
	Mismatches int64   // 422: key reused for another request
	// Tokens as reported by the upstream's usage.
	PromptTokens, CompletionTokens, TotalTokens int64
	RequestBytes, ResponseBytes                 int64
	CostMicros                                  int64 // spend, USD x 1e6
	AvgLatencyMs                                float64
	// P50 and P95 are the histogram buckets holding them, see LatencyQuantile.
	P50, P95 LatencyRange
}

// Totals sums the roll-ups of the minutes that start in [from, to).
func (s *Store) Totals(ctx context.Context, from, to time.Time) (Totals, error) {
	where, args := window(scopeTotal, from, to, rollupSpans)
	rows, err := s.db.WithContext(ctx).Raw(
		"SELECT status_class, "+sumColumns()+" FROM request_rollups WHERE "+where+" GROUP BY status_class", args...).Rows()
	if err != nil {
		return Totals{}, fmt.Errorf("models: totals: %w", err)
	}
	defer rows.Close()
	var all counters
	var errs int64
	for rows.Next() {
		var class int64
		var c counters
		dest := []any{&class}
		for i := range c {
			dest = append(dest, &c[i])
		}
		if err := rows.Scan(dest...); err != nil {
			return Totals{}, fmt.Errorf("models: totals: %w", err)
		}
		all.plus(&c)
		if class == 5 {
			errs += c[cRequests]
		} else {
			errs += c[cUpstreamErrors]
		}
	}
	if err := rows.Err(); err != nil {
		return Totals{}, fmt.Errorf("models: totals: %w", err)
	}
	return newTotals(&all, errs), nil
}

func newTotals(c *counters, errs int64) Totals {
	t := Totals{
		Requests:         c[cRequests],
		Errors:           errs,
		Replays:          c[cReplayed],
		Conflicts:        c[cConflicts],
		Mismatches:       c[cMismatches],
		PromptTokens:     c[cPromptTokens],
		CompletionTokens: c[cCompletionTokens],
		TotalTokens:      c[cTotalTokens],
		RequestBytes:     c[cRequestBytes],
		ResponseBytes:    c[cResponseBytes],
		CostMicros:       c[cCostMicros],
		P50:              LatencyQuantile(c.latency(), c[cLatencyUnsplit], 0.50),
		P95:              LatencyQuantile(c.latency(), c[cLatencyUnsplit], 0.95),
	}
	if t.Requests > 0 {
		t.ErrorRate = float64(errs) / float64(t.Requests)
		t.AvgLatencyMs = float64(c[cDurationMsSum]) / float64(t.Requests)
	}
	return t
}

// LatencyRange is the histogram bucket a latency quantile falls in: the
// quantile is more than AboveMs and at most UpToMs whole milliseconds.
// That bucket is all the roll-ups know, so it is what the dashboard shows;
// interpolating inside it would invent precision (one 0–50 ms bucket once
// made 1 ms requests read "25 ms").
type LatencyRange struct {
	Known   bool  // false without requests
	AboveMs int64 // -1 for the first bucket: under a millisecond
	UpToMs  int64 // -1 past the last bound: slower than AboveMs
}

// LatencyQuantile finds the bucket holding the q-quantile (0..1) of a
// latency histogram with one count per LatencyBoundsMs bucket plus the
// overflow bucket; unsplit counts requests of 0–50 ms from rows written
// before the fine buckets existed. A rank among those reports 0–50 ms.
func LatencyQuantile(hist []int64, unsplit int64, q float64) LatencyRange {
	total := unsplit
	for _, c := range hist {
		total += c
	}
	if total == 0 {
		return LatencyRange{}
	}
	rank := max(1, int64(math.Ceil(q*float64(total)))) // the rank-th fastest request
	if unsplit > 0 {
		var upTo50 int64
		for i, b := range LatencyBoundsMs {
			if b <= 50 {
				upTo50 += hist[i]
			}
		}
		if rank <= upTo50+unsplit {
			return LatencyRange{Known: true, AboveMs: -1, UpToMs: 50}
		}
	}
	cum := unsplit
	above := int64(-1)
	for i, c := range hist {
		if i >= len(LatencyBoundsMs) {
			break
		}
		if cum += c; cum >= rank {
			return LatencyRange{Known: true, AboveMs: above, UpToMs: LatencyBoundsMs[i]}
		}
		above = LatencyBoundsMs[i]
	}
	return LatencyRange{Known: true, AboveMs: above, UpToMs: -1}
}

// TopEntry is one row of a top-N table.
type TopEntry struct {
	Name       string
	Requests   int64
	Tokens     int64 // total tokens
	CostMicros int64 // spend, USD x 1e6
}

// TopModels ranks models by requests in [from, to); limit defaults to 10,
// at most 100. Requests that never named a model appear under "".
func (s *Store) TopModels(ctx context.Context, from, to time.Time, limit int) ([]TopEntry, error) {
	return s.top(ctx, "model", from, to, limit)
}

// TopClients ranks client keys by requests in [from, to), like TopModels.
func (s *Store) TopClients(ctx context.Context, from, to time.Time, limit int) ([]TopEntry, error) {
	return s.top(ctx, "client", from, to, limit)
}

// top groups by column, which is always one of our constants, never input.
func (s *Store) top(ctx context.Context, column string, from, to time.Time, limit int) ([]TopEntry, error) {
	if limit <= 0 {
		limit = 10
	}
	limit = min(limit, 100)
	where, args := window(scopeClientModel, from, to, rollupSpans)
	var out []TopEntry
	err := s.db.WithContext(ctx).Raw(
		"SELECT "+column+" AS name, SUM(requests) AS requests, SUM(total_tokens) AS tokens, SUM(cost_micros) AS cost_micros FROM request_rollups WHERE "+where+
			" GROUP BY "+column+" ORDER BY SUM(requests) DESC, name LIMIT ?", append(args, limit)...).
		Scan(&out).Error
	if err != nil {
		return nil, fmt.Errorf("models: top %ss: %w", column, err)
	}
	return out, nil
}

// ClientUsage is one client's requests and spend in a window.
type ClientUsage struct {
	Requests, Tokens, CostMicros int64
}

// UsageByClient sums requests, tokens and spend per client over the
// minutes that start in [from, to), for the client keys page.
func (s *Store) UsageByClient(ctx context.Context, from, to time.Time) (map[string]ClientUsage, error) {
	where, args := window(scopeClientModel, from, to, rollupSpans)
	var rows []struct {
		Name                         string
		Requests, Tokens, CostMicros int64
	}
	err := s.db.WithContext(ctx).Raw("SELECT client AS name, SUM(requests) AS requests, SUM(total_tokens) AS tokens, SUM(cost_micros) AS cost_micros"+
		" FROM request_rollups WHERE "+where+" GROUP BY client", args...).Scan(&rows).Error
	if err != nil {
		return nil, fmt.Errorf("models: usage by client: %w", err)
	}
	out := make(map[string]ClientUsage, len(rows))
	for _, r := range rows {
		out[r.Name] = ClientUsage{Requests: r.Requests, Tokens: r.Tokens, CostMicros: r.CostMicros}
	}
	return out, nil
}
