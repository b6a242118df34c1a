package models_test

import (
	"context"
	"database/sql"
	"fmt"
	"testing"

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
	s := testdb.Postgres(t, nil)
	db, err := s.DB().DB()
	if err != nil {
		t.Fatal(err)
	}
	// One backend runs every statement, so its statistics tell them all.
	db.SetMaxOpenConns(1)
	for i := range 10 {
		claimComplete(t, s, fmt.Sprint("early-", i))
	}
	// The table grows with no ANALYZE in between.
	if _, err := db.Exec(`INSERT INTO idempotency_records (id, client, method, path, idem_key, fingerprint, state,
		locked_until, created_at, updated_at, expires_at)
		SELECT 'grown-' || i, 'c', 'POST', '/v1/chat/completions', 'grown-' || i, 'f', 'completed',
		now(), now(), now(), now() + interval '1 day' FROM generate_series(1, 50000) AS i`); err != nil {
		t.Fatal(err)
	}
	before := seqScans(t, db)
	for i := range 10 {
		claimComplete(t, s, fmt.Sprint("late-", i))
	}
	if n := seqScans(t, db) - before; n != 0 {
		t.Fatalf("10 claims and completions scanned idempotency_records whole %d times, want 0", n)
	}
}

// seqScans is how often idempotency_records was read whole, as the pool's
// one backend counted it.
func seqScans(t *testing.T, db *sql.DB) int64 {
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
	if err := conn.QueryRowContext(ctx, `SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'idempotency_records'::regclass`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}
