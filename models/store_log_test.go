package models_test

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestFailedStatementsAreLoggedWithoutValues: when the database fails, the
// log names the statement but never its values, and does not flood.
func TestFailedStatementsAreLoggedWithoutValues(t *testing.T) {
	dbURL, fwd := testdb.ThroughForwarder(t, testdb.PostgresURL(t))
	var logs lockedBuffer
	s, err := models.Open(context.Background(), models.Options{DatabaseURL: dbURL, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	fwd.Down()
	const secret = "very-private-idempotency-key-123"
	for i := 0; i < 50; i++ {
		_, _, err := s.ClaimIdempotency(context.Background(), models.ClaimRequest{ID: "x", Client: "c", Key: secret, Fingerprint: "f", Owner: "o", Lease: 1e9, TTL: 1e9})
		if err == nil {
			t.Fatal("claim succeeded with the database down")
		}
	}
	out := logs.String()
	if !strings.Contains(out, "idempotency_records") {
		t.Fatalf("the failure was not logged: %q", out)
	}
	if strings.Contains(out, secret) {
		t.Fatal("a statement's values reached the log")
	}
	// Count failure lines only: start-up logs one line per migration.
	if n := strings.Count(out, "level=ERROR"); n > 5 {
		t.Fatalf("%d error lines for 50 failures in under a second:\n%s", n, out)
	}
}
