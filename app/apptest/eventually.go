package apptest

import (
	"maps"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// Eventually waits until cond holds, checking every few milliseconds, and
// fails the test with the message if it still does not hold after within.
// It is the one way tests wait for something that has no signal of its own.
func Eventually(t testing.TB, within time.Duration, cond func() bool, format string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: "+format, append([]any{within}, args...)...)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// EachDB runs f twice, as sub-tests: on the embedded SQLite, and on a fresh
// PostgreSQL schema (DATABASE_URL). env is the rest of the environment both
// runs get.
func EachDB(t *testing.T, env map[string]string, f func(t *testing.T, env map[string]string)) {
	t.Helper()
	with := func(extra map[string]string) map[string]string {
		out := maps.Clone(env)
		if out == nil {
			out = map[string]string{}
		}
		maps.Copy(out, extra)
		return out
	}
	t.Run("sqlite", func(t *testing.T) { f(t, with(nil)) })
	t.Run("postgres", func(t *testing.T) { f(t, with(map[string]string{"DATABASE_URL": testdb.PostgresURL(t)})) })
}
