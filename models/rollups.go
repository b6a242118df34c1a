package models

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strings"

	"gorm.io/gorm"
)

// ErrInvalidFilter is wrapped by queries given arguments they cannot answer
// (a bad cursor, an unknown status class, a window too wide for its step);
// handlers map it to 400.
var ErrInvalidFilter = errors.New("models: invalid filter")

// LatencyBoundsMs are the inclusive upper bounds, in whole milliseconds of
// RequestLog.DurationMs, of the latency histogram kept in request_rollups
// (columns lat_le_<bound>); one more bucket, lat_le_inf, counts everything
// slower than the last bound. The proxy itself adds well under a
// millisecond, so the buckets start at 0 (under 1 ms) and stay narrow up
// to 50 ms.
var LatencyBoundsMs = [...]int64{0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000}

// unsplitColumn holds the counts of rows written before the fine buckets
// existed (migration 00004): each is a request of 0–50 ms, no finer.
const unsplitColumn = "lat_le_50_unsplit"

// rollupSpans are the grains of the roll-ups in seconds, coarsest first:
// UTC day, hour, minute. Every request is counted at each grain; a window
// reads the coarsest rows that fit inside it (see cover).
var rollupSpans = []int64{86400, 3600, 60}

// Roll-up scopes. Every request is counted in both: charts and totals read
// the few scope 0 rows, top-N tables the per client and model rows.
const (
	scopeTotal       = 0 // client and model left empty
	scopeClientModel = 1
)

// Indexes into counters, in the column order of counterColumns.
const (
	cRequests = iota
	cPromptTokens
	cCompletionTokens
	cTotalTokens
	cRequestBytes
	cResponseBytes
	cDurationMsSum
	cReplayed
	cConflicts
	cMismatches
	cUpstreamErrors
	cCostMicros
	cLatency                                              // first of len(LatencyBoundsMs)+1 histogram buckets
	cLatencyUnsplit = cLatency + len(LatencyBoundsMs) + 1 // never added to, see unsplitColumn
	numCounters     = cLatencyUnsplit + 1
)

// counterColumns names the request_rollups column of each counter.
var counterColumns = func() []string {
	cols := []string{
		"requests", "prompt_tokens", "completion_tokens", "total_tokens",
		"request_bytes", "response_bytes", "duration_ms_sum",
		"replayed", "idempotency_conflicts", "idempotency_mismatches", "upstream_errors",
		"cost_micros",
	}
	for _, b := range LatencyBoundsMs {
		cols = append(cols, fmt.Sprintf("lat_le_%d", b))
	}
	return append(cols, "lat_le_inf", unsplitColumn)
}()

// counters are the additive columns of one roll-up row.
type counters [numCounters]int64

// merge adds o's counts: every counter is a sum.
func (c *counters) merge(o *counters) {
	for i := range c {
		c[i] += o[i]
	}
}

// add counts one request.
func (c *counters) add(r *RequestLog) {
	c[cRequests]++
	c[cPromptTokens] += r.PromptTokens
	c[cCompletionTokens] += r.CompletionTokens
	c[cTotalTokens] += r.TotalTokens
	c[cRequestBytes] += r.RequestBytes
	c[cResponseBytes] += r.ResponseBytes
	c[cDurationMsSum] += r.DurationMs
	c[cCostMicros] += r.CostMicros
	switch r.Outcome {
	case OutcomeReplayed:
		c[cReplayed]++
	case OutcomeIdempotencyConflict:
		c[cConflicts]++
	case OutcomeIdempotencyMismatch:
		c[cMismatches]++
	case OutcomeUpstreamError:
		c[cUpstreamErrors]++
	}
	c[cLatency+latencyBucket(r.DurationMs)]++
}

// plus adds o into c.
func (c *counters) plus(o *counters) {
	for i := range c {
		c[i] += o[i]
	}
}

// latency returns the histogram part, one count per LatencyBoundsMs bucket
// plus the overflow bucket.
func (c *counters) latency() []int64 { return c[cLatency:cLatencyUnsplit] }

// latencyBucket is the histogram bucket of a duration: the first bound it
// does not exceed, or the overflow bucket.
func latencyBucket(ms int64) int {
	i, _ := slices.BinarySearch(LatencyBoundsMs[:], ms)
	return i
}

// StatusClass is the roll-up class of an HTTP status: 2..5 for 2xx..5xx, 0
// for a request that never got a final status (and anything outside
// 200..599, which a proxy does not send).
func StatusClass(status int) int {
	if status < 200 || status > 599 {
		return 0
	}
	return status / 100
}

// rollupKey identifies one request_rollups row.
type rollupKey struct {
	scope         int
	span, bucket  int64
	client, model string
	class         int
}

func compareRollupKeys(a, b rollupKey) int {
	return cmp.Or(
		cmp.Compare(a.scope, b.scope),
		cmp.Compare(a.span, b.span),
		cmp.Compare(a.bucket, b.bucket),
		strings.Compare(a.client, b.client),
		strings.Compare(a.model, b.model),
		cmp.Compare(a.class, b.class),
	)
}

type rollupRow struct {
	key rollupKey
	c   counters
}

// aggregateRollups folds a batch into one row per roll-up key, sorted by
// key: writers on several replicas then lock shared rows in the same order
// and cannot deadlock each other. Each record is counted once, in its
// finest bucket for its client and model; the coarser buckets and the
// totals are summed from those few groups (every span is a multiple of the
// finest, so its buckets hold whole finest ones): one map lookup per
// record rather than one per row it counts in (issue 15).
func aggregateRollups(batch []RequestLog) []rollupRow {
	finest := rollupSpans[len(rollupSpans)-1]
	groups := make(map[rollupKey]*counters)
	for i := range batch {
		r := &batch[i]
		k := rollupKey{scope: scopeClientModel, span: finest, bucket: floorDiv(r.CreatedAt.Unix(), finest) * finest,
			client: r.Client, model: r.Model, class: StatusClass(r.Status)}
		c := groups[k]
		if c == nil {
			c = new(counters)
			groups[k] = c
		}
		c.add(r)
	}
	byKey := make(map[rollupKey]*counters, 2*len(rollupSpans)*len(groups))
	for g, gc := range groups {
		for _, span := range rollupSpans {
			bucket := floorDiv(g.bucket, span) * span
			for _, k := range [...]rollupKey{
				{scope: scopeTotal, span: span, bucket: bucket, class: g.class},
				{scope: scopeClientModel, span: span, bucket: bucket, client: g.client, model: g.model, class: g.class},
			} {
				c := byKey[k]
				if c == nil {
					c = new(counters)
					byKey[k] = c
				}
				c.merge(gc)
			}
		}
	}
	rows := make([]rollupRow, 0, len(byKey))
	for k, c := range byKey {
		rows = append(rows, rollupRow{key: k, c: *c})
	}
	slices.SortFunc(rows, func(a, b rollupRow) int { return compareRollupKeys(a.key, b.key) })
	return rows
}

// floorDiv divides rounding towards minus infinity, so times before 1970
// still land in the bucket that starts before them.
func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && (a < 0) != (b < 0) {
		q--
	}
	return q
}

// upsertRollups adds rows to request_rollups with
// INSERT … ON CONFLICT DO UPDATE SET col = request_rollups.col + excluded.col,
// which both PostgreSQL and SQLite accept, so concurrent writers simply add up.
func upsertRollups(tx *gorm.DB, rows []rollupRow) error {
	for chunk := range slices.Chunk(rows, rowsPerStatement) {
		sql, args := rollupUpsertSQL(chunk)
		if err := tx.Exec(sql, args...).Error; err != nil {
			return err
		}
	}
	return nil
}

func rollupUpsertSQL(rows []rollupRow) (string, []any) {
	var b strings.Builder
	b.WriteString("INSERT INTO request_rollups (scope, span, bucket, client, model, status_class, ")
	b.WriteString(strings.Join(counterColumns, ", "))
	b.WriteString(") VALUES ")
	placeholders := "(" + strings.Repeat("?, ", 6+numCounters-1) + "?)"
	args := make([]any, 0, len(rows)*(6+numCounters))
	for i, r := range rows {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(placeholders)
		args = append(args, r.key.scope, r.key.span, r.key.bucket, r.key.client, r.key.model, r.key.class)
		for _, v := range r.c {
			args = append(args, v)
		}
	}
	b.WriteString(" ON CONFLICT (scope, span, bucket, client, model, status_class) DO UPDATE SET ")
	for i, col := range counterColumns {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%[1]s = request_rollups.%[1]s + excluded.%[1]s", col)
	}
	return b.String(), args
}
