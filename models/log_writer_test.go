package models_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

var base = time.Date(2025, 3, 10, 10, 0, 0, 0, time.UTC)

func fixedNow(t time.Time) func() time.Time { return func() time.Time { return t } }

// writeAll stores recs through a LogWriter and fails unless all are written.
func writeAll(t *testing.T, s *models.Store, recs []models.RequestLog) {
	t.Helper()
	w := models.NewLogWriter(s, models.LogWriterOptions{QueueSize: len(recs) + 1})
	for _, r := range recs {
		if !w.Record(r) {
			t.Fatal("Record dropped a record with room in the queue")
		}
	}
	closeWriter(t, w)
	if w.Written() != uint64(len(recs)) || w.Dropped() != 0 {
		t.Fatalf("written %d, dropped %d; want %d, 0", w.Written(), w.Dropped(), len(recs))
	}
}

func closeWriter(t *testing.T, w *models.LogWriter) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := w.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

func countRows(t *testing.T, s *models.Store, table string) int64 {
	t.Helper()
	var n int64
	if err := s.DB().Table(table).Count(&n).Error; err != nil {
		t.Fatalf("count %s: %v", table, err)
	}
	return n
}

// loadRecord is the i-th record of a varied, deterministic load that
// crosses an hour boundary (09:55 to ~10:09).
func loadRecord(i int) models.RequestLog {
	statuses := []int{200, 200, 200, 201, 304, 400, 429, 500, 502, 0}
	outcomes := []string{
		models.OutcomeProxied, models.OutcomeReplayed, models.OutcomeIdempotencyConflict,
		models.OutcomeIdempotencyMismatch, models.OutcomeUpstreamError, models.OutcomeProxied, models.OutcomeRejected,
	}
	return models.RequestLog{
		CreatedAt:        base.Add(-5*time.Minute + time.Duration(i)*173*time.Millisecond),
		Client:           fmt.Sprintf("client-%d", i%5),
		Method:           "POST",
		Path:             "/v1/chat/completions",
		Model:            fmt.Sprintf("model-%d", i%3),
		Status:           statuses[i%len(statuses)],
		Outcome:          outcomes[i%len(outcomes)],
		DurationMs:       int64(i*37) % 130000,
		RequestBytes:     int64(100 + i%50),
		ResponseBytes:    int64(1000 + i%500),
		PromptTokens:     int64(i % 100),
		CompletionTokens: int64(i % 30),
		TotalTokens:      int64(i%100 + i%30),
	}
}

func TestLogWriterBatchesUnderLoad(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		const n, producers = 5000, 8
		var mu sync.Mutex
		var batches []int
		w := models.NewLogWriter(s, models.LogWriterOptions{OnBatch: func(written, dropped int) {
			mu.Lock()
			defer mu.Unlock()
			batches = append(batches, written+dropped)
		}})
		var wg sync.WaitGroup
		for p := range producers {
			wg.Go(func() {
				for i := p; i < n; i += producers {
					if !w.Record(loadRecord(i)) {
						t.Error("Record dropped under a queue of 10000")
					}
				}
			})
		}
		wg.Wait()
		closeWriter(t, w)

		if w.Written() != n || w.Dropped() != 0 {
			t.Fatalf("written %d, dropped %d; want %d, 0", w.Written(), w.Dropped(), n)
		}
		if got := countRows(t, s, "request_logs"); got != n {
			t.Fatalf("request_logs has %d rows, want %d", got, n)
		}
		sum := 0
		for _, b := range batches {
			if b > 500 {
				t.Errorf("batch of %d records exceeds BatchSize 500", b)
			}
			sum += b
		}
		if sum != n || len(batches) < n/500 {
			t.Errorf("%d batches summing to %d; want at least %d summing to %d", len(batches), sum, n/500, n)
		}
		checkRollupsMatchRaw(t, s, n)
	})
}

type sums struct{ Requests, Prompt, Completion, Total, In, Out, Duration int64 }

// checkRollupsMatchRaw compares each span's roll-ups with sums over the
// raw rows and with the load's own per-minute counts.
func checkRollupsMatchRaw(t *testing.T, s *models.Store, n int) {
	t.Helper()
	var raw sums
	err := s.DB().Raw(`SELECT COUNT(*) AS requests, SUM(prompt_tokens) AS prompt, SUM(completion_tokens) AS completion,
		SUM(total_tokens) AS total, SUM(request_bytes) AS "in", SUM(response_bytes) AS "out", SUM(duration_ms) AS duration
		FROM request_logs`).Scan(&raw).Error
	if err != nil {
		t.Fatal(err)
	}
	var want sums
	var replayed, upstreamErrors int64
	perMinute := map[string]int64{}
	for i := range n {
		r := loadRecord(i)
		want.Requests++
		want.Prompt += r.PromptTokens
		want.Completion += r.CompletionTokens
		want.Total += r.TotalTokens
		want.In += r.RequestBytes
		want.Out += r.ResponseBytes
		want.Duration += r.DurationMs
		if r.Outcome == models.OutcomeReplayed {
			replayed++
		}
		if r.Outcome == models.OutcomeUpstreamError {
			upstreamErrors++
		}
		class := r.Status / 100
		if r.Status == 0 {
			class = 0
		}
		perMinute[fmt.Sprintf("%d/%s/%s/%d", r.CreatedAt.Truncate(time.Minute).Unix(), r.Client, r.Model, class)]++
	}
	if raw != want {
		t.Fatalf("raw sums %+v, want %+v", raw, want)
	}
	for _, scope := range []int{0, 1} {
		for _, span := range []int{60, 3600, 86400} {
			checkRollupSums(t, s, scope, span, want, replayed, upstreamErrors, int64(n))
		}
	}
	var detailed int64
	s.DB().Table("request_rollups").Where("scope = 0 AND (client <> '' OR model <> '')").Count(&detailed)
	if detailed != 0 {
		t.Errorf("%d scope 0 roll-up rows name a client or model; they must aggregate them away", detailed)
	}
	rows, err := s.DB().Raw("SELECT bucket, client, model, status_class, requests FROM request_rollups WHERE scope = 1 AND span = 60").Rows()
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	got := map[string]int64{}
	for rows.Next() {
		var bucket, class, requests int64
		var client, model string
		if err := rows.Scan(&bucket, &client, &model, &class, &requests); err != nil {
			t.Fatal(err)
		}
		got[fmt.Sprintf("%d/%s/%s/%d", bucket, client, model, class)] = requests
	}
	if len(got) != len(perMinute) {
		t.Errorf("%d minute roll-up rows, want %d", len(got), len(perMinute))
	}
	for k, v := range perMinute {
		if got[k] != v {
			t.Errorf("minute roll-up %s: %d requests, want %d", k, got[k], v)
		}
	}
}

// checkRollupSums compares one scope and span of the roll-ups with the
// expected sums: each of them counts every request once.
func checkRollupSums(t *testing.T, s *models.Store, scope, span int, want sums, replayed, upstreamErrors, n int64) {
	t.Helper()
	var got sums
	var gotReplayed, gotUpstream, histogram int64
	row := s.DB().Raw(`SELECT SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(total_tokens),
		SUM(request_bytes), SUM(response_bytes), SUM(duration_ms_sum), SUM(replayed), SUM(upstream_errors),
		SUM(lat_le_0 + lat_le_1 + lat_le_2 + lat_le_5 + lat_le_10 + lat_le_25 + lat_le_50 + lat_le_100 + lat_le_250 + lat_le_500 + lat_le_1000 + lat_le_2500 + lat_le_5000 +
		    lat_le_10000 + lat_le_30000 + lat_le_60000 + lat_le_120000 + lat_le_inf)
		FROM request_rollups WHERE scope = ? AND span = ?`, scope, span).Row()
	if err := row.Scan(&got.Requests, &got.Prompt, &got.Completion, &got.Total, &got.In, &got.Out, &got.Duration,
		&gotReplayed, &gotUpstream, &histogram); err != nil {
		t.Fatal(err)
	}
	if got != want || gotReplayed != replayed || gotUpstream != upstreamErrors || histogram != n {
		t.Errorf("scope %d span %d roll-ups %+v replayed %d upstream %d histogram %d; want %+v %d %d %d",
			scope, span, got, gotReplayed, gotUpstream, histogram, want, replayed, upstreamErrors, n)
	}
}

func TestLogWriterDatabaseDown(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		sqlDB, err := s.DB().DB()
		if err != nil {
			t.Fatal(err)
		}
		if err := sqlDB.Close(); err != nil {
			t.Fatal(err)
		}
		before := runtime.NumGoroutine()
		w := models.NewLogWriter(s, models.LogWriterOptions{
			QueueSize: 16, BatchSize: 4, FlushInterval: 5 * time.Millisecond,
			Retries: 2, RetryBackoff: time.Millisecond,
		})
		const n = 2000
		accepted := 0
		for i := range n {
			if w.Record(loadRecord(i)) {
				accepted++
			}
			if i%50 == 0 {
				if g := writerGoroutines(); g != 1 {
					t.Fatalf("%d goroutines run the writer after %d records: it must be one", g, i+1)
				}
			}
		}
		if w.Dropped() == 0 || accepted == n {
			t.Errorf("dropped %d, accepted %d of %d: a 16-record queue cannot take them all", w.Dropped(), accepted, n)
		}
		closeWriter(t, w)
		if w.Written() != 0 || w.Dropped() != n {
			t.Errorf("written %d, dropped %d; want 0, %d", w.Written(), w.Dropped(), n)
		}
		waitGoroutines(t, before)
	})
}

// writerGoroutines counts the goroutines running LogWriter code; other
// goroutines of the process (a closing pool's, the test runner's) may come
// and go meanwhile.
func writerGoroutines() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		// A goroutine not started yet shows as NewLogWriter's wrapper.
		if bytes.Contains(g, []byte("models.(*LogWriter)")) || bytes.Contains(g, []byte("models.NewLogWriter.gowrap")) {
			n++
		}
	}
	return n
}

// waitGoroutines polls until the goroutine count is back to want: an
// exiting goroutine is counted until the scheduler has retired it, and
// there is no signal for that.
func waitGoroutines(t *testing.T, want int) {
	t.Helper()
	apptest.Eventually(t, 5*time.Second, func() bool { return runtime.NumGoroutine() <= want }, "more than %d goroutines", want)
}

// TestLogWriterSlowDatabase holds a lock that stalls every write: Record
// must still return at once, and the writer must recover when it lifts.
// PostgreSQL only: SQLite's busy handler ignores context cancellation, so
// there an attempt waits out busy_timeout (10s) instead of WriteTimeout.
func TestLogWriterSlowDatabase(t *testing.T) {
	s := testdb.Postgres(t, fixedNow(base))
	unlock := lockRequestLogs(t, s)
	batched := make(chan struct{}, 1000)
	w := models.NewLogWriter(s, models.LogWriterOptions{
		QueueSize: 8, BatchSize: 4, FlushInterval: 5 * time.Millisecond,
		Retries: -1, WriteTimeout: 300 * time.Millisecond,
		OnBatch: func(int, int) { batched <- struct{}{} },
	})
	const n = 1000
	start := time.Now()
	for i := range n {
		w.Record(loadRecord(i))
	}
	// A Record that waited for the database would take 300 ms per batch.
	if d := time.Since(start); d > time.Second {
		t.Errorf("%d Record calls took %v with the database stalled", n, d)
	}
	select {
	case <-batched: // the first stalled batch timed out and was dropped
	case <-time.After(10 * time.Second):
		t.Fatal("no batch finished within 10s of a 300ms write timeout")
	}
	unlock()
	closeWriter(t, w)
	if w.Dropped() == 0 || w.Written() == 0 || w.Written()+w.Dropped() != n {
		t.Errorf("written %d, dropped %d of %d: want some of each, none lost unaccounted", w.Written(), w.Dropped(), n)
	}
	if got := countRows(t, s, "request_logs"); got != int64(w.Written()) {
		t.Errorf("%d rows, writer reports %d written", got, w.Written())
	}
}

// lockRequestLogs stalls every write to request_logs until unlock.
func lockRequestLogs(t *testing.T, s *models.Store) (unlock func()) {
	t.Helper()
	ctx := context.Background()
	sqlDB, _ := s.DB().DB()
	conn, err := sqlDB.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	for _, q := range []string{"BEGIN", "LOCK TABLE request_logs IN ACCESS EXCLUSIVE MODE"} {
		if _, err := conn.ExecContext(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	return func() {
		if _, err := conn.ExecContext(ctx, "ROLLBACK"); err != nil {
			t.Fatal(err)
		}
	}
}

// TestLogWriterCloseDeadline: when the database hangs, Close gives up at
// its context's deadline and accounts for every record.
func TestLogWriterCloseDeadline(t *testing.T) {
	s := testdb.Postgres(t, fixedNow(base))
	lockRequestLogs(t, s)
	w := models.NewLogWriter(s, models.LogWriterOptions{WriteTimeout: time.Minute})
	for i := range 10 {
		w.Record(loadRecord(i))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := w.Close(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Close: %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Close took %v with a 200ms deadline", d)
	}
	if w.Written() != 0 || w.Dropped() != 10 {
		t.Errorf("written %d, dropped %d; want 0, 10", w.Written(), w.Dropped())
	}
}

func TestLogWriterCloseFlushesEverything(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		var batches []int // written by the writer goroutine, read after Close
		w := models.NewLogWriter(s, models.LogWriterOptions{
			BatchSize: 1000, FlushInterval: time.Hour,
			OnBatch: func(written, _ int) { batches = append(batches, written) },
		})
		for i := range 123 {
			w.Record(loadRecord(i))
		}
		closeWriter(t, w)
		if got := countRows(t, s, "request_logs"); got != 123 {
			t.Errorf("%d rows after Close, want 123", got)
		}
		if len(batches) != 1 || batches[0] != 123 {
			t.Errorf("batches %v, want one of 123 written by Close", batches)
		}
		if w.Record(loadRecord(0)) || w.Dropped() != 1 {
			t.Errorf("Record after Close: dropped %d, want refused and counted", w.Dropped())
		}
		closeWriter(t, w) // a second Close is harmless
	})
}

func TestLogWriterFlushesOnInterval(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		batched := make(chan int, 10)
		w := models.NewLogWriter(s, models.LogWriterOptions{
			BatchSize: 1000, FlushInterval: 20 * time.Millisecond,
			OnBatch: func(written, _ int) { batched <- written },
		})
		defer closeWriter(t, w)
		for i := range 3 {
			w.Record(loadRecord(i))
		}
		select {
		case n := <-batched:
			if n != 3 {
				t.Errorf("first batch wrote %d, want 3", n)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a partial batch was not flushed by the interval")
		}
		if got := countRows(t, s, "request_logs"); got != 3 {
			t.Errorf("%d rows before Close, want 3", got)
		}
	})
}

// TestLogWriterStoresEveryField reads a record back whole: each field has
// its own value (integers above 255, text with quotes and non-ASCII), so a
// column written from the wrong field, or a value lost on the way to the
// database, shows.
func TestLogWriterStoresEveryField(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		plain := models.RequestLog{
			CreatedAt: base.Add(-time.Minute).Add(123456 * time.Microsecond), Client: "client \"a\"", Method: "POST",
			Path: "/v1/responses", Model: "gpt-4o-mini", Stream: true, Status: 502, Outcome: models.OutcomeUpstreamError,
			DurationMs: 1001, TTFBMs: 1002, RequestBytes: 1003, ResponseBytes: 1004,
			PromptTokens: 1005, CompletionTokens: 1006, TotalTokens: 2011, CachedTokens: 1007, ReasoningTokens: 1008,
			CostMicros: 1009, UpstreamRequestID: "req_\\1", IdempotencyKey: "clé-1", Error: "upstream_cut: {\"x\"}",
			ClientIP: "203.0.113.9", UserAgent: "agent/1.0 ☃",
		}
		// What PostgreSQL's COPY text format reads specially, in every
		// text column: delimiters, escapes, its NULL and end-of-data marks.
		odd := models.RequestLog{
			CreatedAt: base.Add(-2 * time.Minute), Client: "a\tb", Method: "\\N", Path: "/v1/x\ny", Model: "\\.",
			Status: 0, Outcome: "c\r\nd", DurationMs: math.MaxInt64, TTFBMs: math.MinInt64, RequestBytes: -1,
			UpstreamRequestID: "\\\\t", IdempotencyKey: "\t\t", Error: "\\.\n\\N\n", ClientIP: "", UserAgent: "\\x41\\101\b\f\v",
		}
		writeAll(t, s, []models.RequestLog{plain, odd})
		page, err := s.ListRequestLogs(context.Background(), models.LogFilter{})
		if err != nil || len(page.Logs) != 2 {
			t.Fatalf("list: %v, %d rows", err, len(page.Logs))
		}
		for i, want := range []models.RequestLog{plain, odd} { // newest first
			got := page.Logs[i]
			if !got.CreatedAt.Equal(want.CreatedAt) {
				t.Errorf("created_at %v, want %v", got.CreatedAt, want.CreatedAt)
			}
			got.ID, got.CreatedAt = 0, want.CreatedAt
			if got != want {
				t.Errorf("read back\n%+v\nwant\n%+v", got, want)
			}
		}
	})
}

func TestLogWriterStoresHostileText(t *testing.T) {
	testdb.Each(t, fixedNow(base), func(t *testing.T, s *models.Store) {
		r := loadRecord(1)
		r.UserAgent = "bad\xff\xfe agent"
		r.Model = "gpt\x00-4o"
		r.Error = strings.Repeat("é", 5000) // 10000 bytes
		r.CreatedAt = time.Date(2025, 3, 10, 12, 0, 0, 123456789, time.FixedZone("CET", 3600))
		writeAll(t, s, []models.RequestLog{r})
		page, err := s.ListRequestLogs(context.Background(), models.LogFilter{})
		if err != nil || len(page.Logs) != 1 {
			t.Fatalf("list: %v, %d rows", err, len(page.Logs))
		}
		got := page.Logs[0]
		if got.UserAgent != "bad\uFFFD agent" || got.Model != "gpt-4o" {
			t.Errorf("user agent %q, model %q", got.UserAgent, got.Model)
		}
		if len(got.Error) > 1024+3 || !utf8.ValidString(got.Error) {
			t.Errorf("error of %d bytes, valid UTF-8 %v", len(got.Error), utf8.ValidString(got.Error))
		}
		if want := time.Date(2025, 3, 10, 11, 0, 0, 123456000, time.UTC); !got.CreatedAt.Equal(want) || got.CreatedAt.Location() != time.UTC {
			t.Errorf("created_at %v, want %v in UTC", got.CreatedAt, want)
		}
	})
}
