// Package testdb opens real databases for tests: a fresh SQLite file, or a
// fresh schema in the PostgreSQL named by TEST_DATABASE_URL.
package testdb

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver for schema setup

	"github.com/openai-idempotent-proxy/proxy/models"
)

// PostgresURL returns a URL for a new, empty schema in the test PostgreSQL,
// dropped when the test ends. Without TEST_DATABASE_URL the test is skipped
// locally; under CI (CI set) it fails, so a missing database never passes
// as green.
func PostgresURL(t testing.TB) string {
	t.Helper()
	base := os.Getenv("TEST_DATABASE_URL")
	if base == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("TEST_DATABASE_URL is not set: PostgreSQL tests cannot run under CI")
		}
		t.Skip("TEST_DATABASE_URL not set: skipping PostgreSQL test")
	}
	admin, err := sql.Open("pgx", base)
	if err != nil {
		t.Fatalf("testdb: %v", err)
	}
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	schema := "t_" + randomHex(8)
	if _, err := admin.ExecContext(ctx, "CREATE SCHEMA "+schema); err != nil {
		t.Fatalf("testdb: PostgreSQL at TEST_DATABASE_URL unreachable: %v", err)
	}
	t.Cleanup(func() {
		db, err := sql.Open("pgx", base)
		if err != nil {
			return
		}
		defer db.Close()
		_, _ = db.Exec("DROP SCHEMA " + schema + " CASCADE")
	})
	u, err := url.Parse(base)
	if err != nil {
		t.Fatalf("testdb: bad TEST_DATABASE_URL: %v", err)
	}
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	return u.String()
}

// Postgres opens a migrated store on a fresh PostgreSQL schema.
func Postgres(t testing.TB, now func() time.Time) *models.Store {
	t.Helper()
	return open(t, models.Options{DatabaseURL: PostgresURL(t), Now: now})
}

// SQLite opens a migrated store on a fresh SQLite file.
func SQLite(t testing.TB, now func() time.Time) *models.Store {
	t.Helper()
	return open(t, models.Options{DataDir: t.TempDir(), Now: now})
}

// Each runs f once per database: SQLite always, PostgreSQL when available.
func Each(t *testing.T, now func() time.Time, f func(t *testing.T, s *models.Store)) {
	t.Helper()
	t.Run("sqlite", func(t *testing.T) { f(t, SQLite(t, now)) })
	t.Run("postgres", func(t *testing.T) { f(t, Postgres(t, now)) })
}

func open(t testing.TB, opts models.Options) *models.Store {
	t.Helper()
	s, err := models.Open(context.Background(), opts)
	if err != nil {
		t.Fatalf("testdb: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Clock is a settable fake clock for tests of expiry and leases.
type Clock struct {
	mu sync.Mutex
	t  time.Time
}

// NewClock starts a fake clock at t.
func NewClock(t time.Time) *Clock { return &Clock{t: t} }

// Now returns the fake time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the fake time forward by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}
