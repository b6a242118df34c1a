package models

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// TestRollupsFoldAsEachRecordCounted: the roll-ups summed from the finest
// groups are the rows that counting every record in every bucket gives,
// across day, hour and minute boundaries and before 1970.
func TestRollupsFoldAsEachRecordCounted(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	base := time.Date(2026, 12, 7, 23, 58, 0, 0, time.UTC).Unix()
	var batch []RequestLog
	for i := range 2000 {
		at := base + rng.Int64N(3*3600) - 3600
		if i%100 == 0 {
			at = -86400 - rng.Int64N(600) // before 1970
		}
		batch = append(batch, RequestLog{
			CreatedAt: time.Unix(at, 0).UTC(), Client: []string{"a", "b", "c"}[rng.IntN(3)], Model: []string{"m1", "m2"}[rng.IntN(2)],
			Status: []int{200, 200, 429, 500}[rng.IntN(4)], Outcome: []string{OutcomeProxied, OutcomeReplayed, OutcomeUpstreamError}[rng.IntN(3)],
			DurationMs: rng.Int64N(5000), PromptTokens: rng.Int64N(100), CompletionTokens: rng.Int64N(100), CostMicros: rng.Int64N(1000),
		})
	}
	if got, want := aggregateRollups(batch), eachRecordCounted(batch); !slices.Equal(got, want) {
		t.Fatalf("%d rows folded, %d counted one by one; first difference at %d", len(got), len(want), firstDifference(got, want))
	}
}

// eachRecordCounted is the roll-up by definition: every record added to
// the row of each span and scope it falls in.
func eachRecordCounted(batch []RequestLog) []rollupRow {
	byKey := map[rollupKey]*counters{}
	for i := range batch {
		r := &batch[i]
		for _, span := range rollupSpans {
			bucket := floorDiv(r.CreatedAt.Unix(), span) * span
			for _, k := range [...]rollupKey{
				{scope: scopeTotal, span: span, bucket: bucket, class: StatusClass(r.Status)},
				{scope: scopeClientModel, span: span, bucket: bucket, client: r.Client, model: r.Model, class: StatusClass(r.Status)},
			} {
				if byKey[k] == nil {
					byKey[k] = new(counters)
				}
				byKey[k].add(r)
			}
		}
	}
	var rows []rollupRow
	for k, c := range byKey {
		rows = append(rows, rollupRow{key: k, c: *c})
	}
	slices.SortFunc(rows, func(a, b rollupRow) int { return compareRollupKeys(a.key, b.key) })
	return rows
}

func firstDifference(a, b []rollupRow) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
