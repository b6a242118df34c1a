package models_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// BenchmarkLogWriter measures how fast the writer drains its queue into
// the database: each op records 20,000 records, then Close waits for them.
// cpu-ns/record is this process's CPU per record (not the PostgreSQL
// server's).
//
//	go test ./models -run '^$' -bench LogWriter -benchtime 5x
func BenchmarkLogWriter(b *testing.B) {
	for _, db := range []struct {
		name string
		open func(testing.TB, func() time.Time) *models.Store
	}{{"sqlite", testdb.SQLite}, {"postgres", testdb.Postgres}} {
		b.Run(db.name, func(b *testing.B) {
			s := db.open(b, time.Now)
			const perOp = 20000
			recs := make([]models.RequestLog, perOp)
			for i := range recs {
				recs[i] = loadRecord(i)
			}
			var elapsed, cpu time.Duration
			b.ReportAllocs()
			for b.Loop() {
				w := models.NewLogWriter(s, models.LogWriterOptions{QueueSize: perOp})
				start, cpuStart := time.Now(), processCPU(b)
				for _, r := range recs {
					w.Record(r)
				}
				if err := w.Close(context.Background()); err != nil {
					b.Fatal(err)
				}
				elapsed += time.Since(start)
				cpu += processCPU(b) - cpuStart
				if w.Written() != perOp {
					b.Fatalf("written %d of %d", w.Written(), perOp)
				}
			}
			b.ReportMetric(float64(b.N*perOp)/elapsed.Seconds(), "records/s")
			// This process's CPU (the writer, GORM or the driver, and
			// SQLite itself), not the PostgreSQL server's.
			b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N*perOp), "cpu-ns/record")
		})
	}
}

// TestTenMillionRows seeds 10M request logs over 7 days into a scratch
// PostgreSQL schema, builds their roll-ups, and times the dashboard
// queries, printing each one's EXPLAIN ANALYZE. Opt-in, it takes minutes:
//
//	SEED_10M=1 go test ./models -run TenMillion -v -timeout 60m
func TestTenMillionRows(t *testing.T) {
	if os.Getenv("SEED_10M") == "" {
		t.Skip("set SEED_10M=1 to seed 10M rows and time the dashboard queries")
	}
	end := time.Date(2025, 3, 10, 12, 34, 56, 0, time.UTC)
	s := testdb.Postgres(t, fixedNow(end))
	seed10M(t, s, end)

	capture := captureSQL(s.DB())
	ctx := context.Background()
	day, week, month := end.Add(-24*time.Hour), end.Add(-7*24*time.Hour), end.Add(-30*24*time.Hour)
	var cursor string
	queries := []struct {
		name string
		run  func() error
	}{
		{"Traffic 24h, 1h steps", func() error { _, err := s.Traffic(ctx, day, end, time.Hour); return err }},
		{"Traffic 24h, 5m steps", func() error { _, err := s.Traffic(ctx, day, end, 5*time.Minute); return err }},
		{"Traffic 7d, 1h steps", func() error { _, err := s.Traffic(ctx, week, end, time.Hour); return err }},
		{"Totals 24h", func() error { _, err := s.Totals(ctx, day, end); return err }},
		{"Totals 7d", func() error { _, err := s.Totals(ctx, week, end); return err }},
		{"TopModels 24h", func() error { _, err := s.TopModels(ctx, day, end, 10); return err }},
		{"TopModels 7d", func() error { _, err := s.TopModels(ctx, week, end, 10); return err }},
		{"TopClients 24h", func() error { _, err := s.TopClients(ctx, day, end, 10); return err }},
		{"TopClients 7d", func() error { _, err := s.TopClients(ctx, week, end, 10); return err }},
		{"Totals 30d", func() error { _, err := s.Totals(ctx, month, end); return err }},
		{"Traffic 30d, 1d steps", func() error { _, err := s.Traffic(ctx, month, end, 24*time.Hour); return err }},
		{"TopModels 30d", func() error { _, err := s.TopModels(ctx, month, end, 10); return err }},
		{"List first page", func() error {
			p, err := s.ListRequestLogs(ctx, models.LogFilter{})
			cursor = p.Next
			return err
		}},
		{"List second page (cursor)", func() error {
			_, err := s.ListRequestLogs(ctx, models.LogFilter{Cursor: cursor})
			return err
		}},
		{"List 5xx", func() error { _, err := s.ListRequestLogs(ctx, models.LogFilter{StatusClass: 5}); return err }},
		{"List model", func() error { _, err := s.ListRequestLogs(ctx, models.LogFilter{Model: "model-5"}); return err }},
		{"List rare client + 4xx", func() error {
			_, err := s.ListRequestLogs(ctx, models.LogFilter{Client: "client-19", StatusClass: 4})
			return err
		}},
		{"List outcome conflict", func() error {
			_, err := s.ListRequestLogs(ctx, models.LogFilter{Outcome: models.OutcomeIdempotencyConflict})
			return err
		}},
		{"List idempotency key", func() error {
			_, err := s.ListRequestLogs(ctx, models.LogFilter{IdempotencyKey: "key-4242"})
			return err
		}},
		{"List path, last 6h of 3 days ago", func() error {
			_, err := s.ListRequestLogs(ctx, models.LogFilter{Path: "/v1/embeddings",
				From: end.Add(-78 * time.Hour), To: end.Add(-72 * time.Hour)})
			return err
		}},
	}
	for _, q := range queries {
		capture.take()
		if err := q.run(); err != nil { // warm the cache and capture the SQL
			t.Fatalf("%s: %v", q.name, err)
		}
		stmts := capture.take()
		var runs []time.Duration
		for range 7 {
			start := time.Now()
			if err := q.run(); err != nil {
				t.Fatal(err)
			}
			runs = append(runs, time.Since(start))
		}
		slices.Sort(runs)
		median := runs[len(runs)/2]
		t.Logf("%-34s median %8.2f ms  (min %.2f, max %.2f)", q.name, ms(median), ms(runs[0]), ms(runs[len(runs)-1]))
		if median > 100*time.Millisecond {
			t.Errorf("%s: median %v, want well under 100ms", q.name, median)
		}
		for _, sql := range stmts {
			t.Logf("EXPLAIN ANALYZE %s\n%s", sql, explain(t, s, sql))
		}
	}
	minuteOnly(t, s, week, end)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// sqlCapture records the statements GORM runs, with their values
// inlined, so the test can EXPLAIN them.
type sqlCapture struct {
	mu    sync.Mutex
	stmts []string
}

func captureSQL(db *gorm.DB) *sqlCapture {
	c := &sqlCapture{}
	record := func(tx *gorm.DB) {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.stmts = append(c.stmts, tx.Dialector.Explain(tx.Statement.SQL.String(), tx.Statement.Vars...))
	}
	_ = db.Callback().Query().After("gorm:query").Register("test:capture", record)
	_ = db.Callback().Row().After("gorm:row").Register("test:capture", record)
	return c
}

// take returns the statements recorded since the last take.
func (c *sqlCapture) take() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	stmts := c.stmts
	c.stmts = nil
	return stmts
}

func explain(t *testing.T, s *models.Store, sql string) string {
	t.Helper()
	var lines []string
	if err := s.DB().Raw("EXPLAIN (ANALYZE, BUFFERS) " + sql).Scan(&lines).Error; err != nil {
		t.Fatalf("explain: %v", err)
	}
	return strings.Join(lines, "\n")
}

// minuteOnly times the 7-day totals read from per client and model minute
// roll-ups alone, the first design, for comparison.
func minuteOnly(t *testing.T, s *models.Store, from, to time.Time) {
	sql := fmt.Sprintf("SELECT status_class, SUM(requests), SUM(total_tokens), SUM(lat_le_50) FROM request_rollups"+
		" WHERE scope = 1 AND span = 60 AND bucket >= %d AND bucket < %d GROUP BY status_class", from.Unix(), to.Unix())
	start := time.Now()
	out := explain(t, s, sql)
	t.Logf("minute roll-ups only, 7d totals: %.1f ms\n%s", ms(time.Since(start)), out)
}

// seed10M fills request_logs with 10M rows over the 7 days before end, with
// indexes dropped during the load and rebuilt after (as a restore would),
// then derives the roll-ups from the raw rows with one GROUP BY.
func seed10M(t *testing.T, s *models.Store, end time.Time) {
	ctx := context.Background()
	db := s.DB().WithContext(ctx)
	step := time.Duration(7 * 24 * time.Hour / 10_000_000)
	var indexDefs []string
	must(t, db.Raw("SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'request_logs' AND indexname <> 'request_logs_pkey'").
		Scan(&indexDefs).Error)
	for _, def := range indexDefs {
		name := strings.Fields(def)[2]
		must(t, db.Exec("DROP INDEX "+name).Error)
	}
	start := time.Now()
	// 20 clients, the low numbers busiest; each client sticks to its own
	// model 80% of the time; ~93% 2xx; 10% carry an Idempotency-Key.
	must(t, db.Exec(`
INSERT INTO request_logs (created_at, client, method, path, model, stream, status, outcome, duration_ms, ttfb_ms,
	request_bytes, response_bytes, prompt_tokens, completion_tokens, total_tokens, idempotency_key, client_ip, user_agent)
SELECT created_at, 'client-' || c, 'POST', path, 'model-' || m, r3 < 0.5, status,
	CASE WHEN status IN (0, 502) THEN 'upstream_error'
	     WHEN status = 409 THEN 'idempotency_conflict'
	     WHEN status = 422 THEN 'idempotency_mismatch'
	     WHEN status = 200 AND r5 < 0.05 THEN 'replayed'
	     ELSE 'proxied' END,
	dur, dur / 4, 200 + floor(r3 * 4000)::int, 500 + floor(r2 * 8000)::int, pt, ct, pt + ct,
	CASE WHEN r5 < 0.1 THEN 'key-' || (g % 100000) ELSE '' END, '10.0.0.' || c, 'bench/1.0'
FROM (
	SELECT g, r2, r3, r5,
		?::timestamptz - g * ?::bigint * interval '1 microsecond' AS created_at,
		floor(20 * r1 * r1)::int AS c,
		CASE WHEN r2 < 0.8 THEN floor(20 * r1 * r1)::int % 8 ELSE floor(r3 * 8)::int END AS m,
		CASE WHEN r3 < 0.85 THEN '/v1/chat/completions' WHEN r3 < 0.95 THEN '/v1/embeddings' ELSE '/v1/responses' END AS path,
		CASE WHEN r4 < 0.93 THEN 200 WHEN r4 < 0.955 THEN 429 WHEN r4 < 0.97 THEN 400 WHEN r4 < 0.975 THEN 409
		     WHEN r4 < 0.978 THEN 422 WHEN r4 < 0.988 THEN 500 WHEN r4 < 0.995 THEN 502 ELSE 0 END AS status,
		floor(-ln(1 - r5) * 900)::bigint AS dur,
		floor(r2 * 2000)::bigint AS pt, floor(r4 * 600)::bigint AS ct
	FROM (SELECT g, random() r1, random() r2, random() r3, random() r4, random() r5
	      FROM generate_series(1, 10000000) g) raw
) x ORDER BY created_at`, end, step.Microseconds()).Error)
	t.Logf("seeded 10M rows in %v", time.Since(start))

	start = time.Now()
	must(t, db.Transaction(func(tx *gorm.DB) error {
		if err := tx.Exec("SET LOCAL maintenance_work_mem = '512MB'").Error; err != nil {
			return err
		}
		for _, def := range indexDefs {
			if err := tx.Exec(def).Error; err != nil {
				return err
			}
		}
		return nil
	}))
	t.Logf("rebuilt %d indexes in %v", len(indexDefs), time.Since(start))

	start = time.Now()
	hist, histCols := []string{}, []string{}
	lower := int64(-1)
	for _, b := range models.LatencyBoundsMs {
		hist = append(hist, fmt.Sprintf("count(*) FILTER (WHERE duration_ms > %d AND duration_ms <= %d)", lower, b))
		histCols = append(histCols, fmt.Sprintf("lat_le_%d", b))
		lower = b
	}
	histCols = append(histCols, "lat_le_inf")
	hist = append(hist, fmt.Sprintf("count(*) FILTER (WHERE duration_ms > %d)", lower))
	must(t, db.Exec(`
INSERT INTO request_rollups (scope, span, bucket, client, model, status_class, requests, prompt_tokens, completion_tokens,
	total_tokens, request_bytes, response_bytes, duration_ms_sum, replayed, idempotency_conflicts,
	idempotency_mismatches, upstream_errors, `+strings.Join(histCols, ", ")+`)
SELECT scope, span, floor(extract(epoch FROM created_at) / span)::bigint * span,
	CASE WHEN scope = 0 THEN '' ELSE client END, CASE WHEN scope = 0 THEN '' ELSE model END,
	CASE WHEN status BETWEEN 200 AND 599 THEN status / 100 ELSE 0 END,
	count(*), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), sum(request_bytes), sum(response_bytes),
	sum(duration_ms), count(*) FILTER (WHERE outcome = 'replayed'), count(*) FILTER (WHERE outcome = 'idempotency_conflict'),
	count(*) FILTER (WHERE outcome = 'idempotency_mismatch'), count(*) FILTER (WHERE outcome = 'upstream_error'),
	`+strings.Join(hist, ", ")+`
FROM request_logs CROSS JOIN (VALUES (0), (1)) AS scopes(scope) CROSS JOIN (VALUES (60), (3600), (86400)) AS spans(span)
GROUP BY 1, 2, 3, 4, 5, 6`).Error)
	must(t, db.Exec("VACUUM ANALYZE request_logs").Error)
	must(t, db.Exec("VACUUM ANALYZE request_rollups").Error)
	t.Logf("built roll-ups and vacuumed in %v", time.Since(start))
	var counts []struct{ Scope, Span, Rows int64 }
	must(t, db.Raw("SELECT scope, span, count(*) AS rows FROM request_rollups GROUP BY 1, 2 ORDER BY 1, 2").Scan(&counts).Error)
	t.Logf("roll-up rows per (scope, span): %v", counts)

	totals, err := s.Totals(ctx, end.Add(-8*24*time.Hour), end.Add(time.Hour))
	if err != nil || totals.Requests != 10_000_000 {
		t.Fatalf("roll-ups hold %d requests (err %v), want 10M", totals.Requests, err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
