package models_test

import (
	"context"
	"database/sql"
	"fmt"
	"testing"

	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// The completion batch joins its rows to idempotency_records by key id.
// PostgreSQL settles on a cached generic plan after a statement's first few
// runs; one made while the table was nearly empty (a fresh deployment, or
// the first minute of a run with autovacuum off or behind) is a hash join
// over a sequential scan, and it stayed cached as the table grew, so every
// batch read the whole table (issue 15: 4,556 scans of up to 100k rows in
// a 60 s load). The completion must stay an index lookup whatever was
// planned before the table grew.
func TestCompletionLooksUpItsRowsWhateverTheTableWasWhenFirstPlanned(t *testing.T) {
	s, db := oneBackend(t)
	for i := range 10 {
		claimComplete(t, s, fmt.Sprint("early-", i))
	}
	// The table grows with no ANALYZE in between.
	insertKeys(t, db, "grown-", 50000, "1 day")
	before := seqScans(t, db)
	for i := range 10 {
		claimComplete(t, s, fmt.Sprint("late-", i))
	}
	if n := seqScans(t, db) - before; n != 0 {
		t.Fatalf("10 claims and completions scanned idempotency_records whole %d times, want 0", n)
	}
}

// The sweeps delete in batches, DELETE … WHERE id IN (SELECT … LIMIT n),
// until a batch comes back short. A generic plan cached while the table was
// small hash-joined the whole table to each batch, so a sweep of a large
// table read it once per batch (issue 15). Now a sweep reads the table about
// once: the batches that find their rows at its front, and the last one,
// which looks for more.
func TestSweepReadsTheTableOnceWhateverTheTableWasWhenFirstPlanned(t *testing.T) {
	s, db := oneBackend(t)
	ctx := context.Background()
	// Sweeps of a small table, in batches of 2: more than the five runs
	// after which PostgreSQL may keep a generic plan.
	for round := range 2 {
		insertKeys(t, db, fmt.Sprintf("small-%d-", round), 10, "-1 day")
		if n, err := s.SweepIdempotency(ctx, 2); err != nil || n != 10 {
			t.Fatalf("small sweep: %d deleted, %v", n, err)
		}
	}
	// The table grows, with no ANALYZE in between: expired rows first (the
	// oldest), then live ones.
	insertKeys(t, db, "expired-", 3000, "-1 day")
	insertKeys(t, db, "live-", 50000, "1 day")
	before := seqRowsRead(t, db)
	if n, err := s.SweepIdempotency(ctx, 1000); err != nil || n != 3000 {
		t.Fatalf("sweep: %d deleted, %v; want 3000", n, err)
	}
	read := seqRowsRead(t, db) - before
	if read > 60000 {
		t.Fatalf("the sweep read %d rows of a 53,000-row table in sequential scans, want about one pass", read)
	}
	t.Logf("the sweep of 3,000 expired rows read %d rows in sequential scans", read)
}

// oneBackend is a PostgreSQL store whose pool holds one connection: one
// backend runs every statement, so its statistics tell them all.
func oneBackend(t *testing.T) (*models.Store, *sql.DB) {
	t.Helper()
	s := testdb.Postgres(t, nil)
	db, err := s.DB().DB()
	if err != nil {
		t.Fatal(err)
	}
	db.SetMaxOpenConns(1)
	return s, db
}

// insertKeys adds n completed keys named prefix1… that expire in expires
// (an interval: "1 day", "-1 day"), straight into the table.
func insertKeys(t *testing.T, db *sql.DB, prefix string, n int, expires string) {
	t.Helper()
	if _, err := db.Exec(`INSERT INTO idempotency_records (id, client, method, path, idem_key, fingerprint, state,
		locked_until, created_at, updated_at, expires_at)
		SELECT $1 || i, 'c', 'POST', '/v1/chat/completions', $1 || i, 'f', 'completed',
		now(), now(), now(), now() + $2::interval FROM generate_series(1, $3::int) AS i`, prefix, expires, n); err != nil {
		t.Fatal(err)
	}
}

// seqRowsRead is the rows sequential scans of idempotency_records returned,
// as the pool's one backend counted them.
func seqRowsRead(t *testing.T, db *sql.DB) int64 {
	t.Helper()
	return tableStat(t, db, "seq_tup_read")
}

// seqScans is how often idempotency_records was read whole, as the pool's
// one backend counted it.
func seqScans(t *testing.T, db *sql.DB) int64 {
	t.Helper()
	return tableStat(t, db, "seq_scan")
}

// tableStat reads one counter of idempotency_records from
// pg_stat_user_tables (column: a constant of the callers).
func tableStat(t *testing.T, db *sql.DB, column string) int64 {
	t.Helper()
	ctx := context.Background()
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// The backend's counts reach the shared statistics when it next goes
	// idle: once this statement ends, before the next one reads them.
	if _, err := conn.ExecContext(ctx, `SELECT pg_stat_force_next_flush()`); err != nil {
		t.Fatal(err)
	}
	var n int64
	if err := conn.QueryRowContext(ctx, `SELECT `+column+` FROM pg_stat_user_tables WHERE relid = 'idempotency_records'::regclass`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}
