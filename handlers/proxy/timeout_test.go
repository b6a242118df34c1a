package proxy_test

import (
	"context"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/handlers/proxy"
)

// TestSharedTimeout: calls close together share one context; every
// context ends between d - d/64 and d after the call that got it, and a
// later call gets a new one.
func TestSharedTimeout(t *testing.T) {
	const d = 640 * time.Millisecond
	next := proxy.SharedTimeout(d)
	within := func(ctx context.Context, asked, got time.Time) {
		t.Helper()
		deadline, ok := ctx.Deadline()
		if !ok || deadline.Before(asked.Add(d-d/64)) || deadline.After(got.Add(d)) {
			t.Fatalf("deadline %v after the call, want %v to %v", deadline.Sub(asked), d-d/64, d)
		}
	}
	asked := time.Now()
	first := next()
	within(first, asked, time.Now())
	// Until the context changes, every call gets the first, which must
	// still end at least d - d/64 after each of them.
	var later context.Context
	apptest.Eventually(t, d, func() bool {
		laterAsked := time.Now()
		if later = next(); later == first {
			within(first, laterAsked, time.Now())
			return false
		}
		within(later, laterAsked, time.Now())
		return true
	}, "no new context after d/64")
	<-first.Done()
	if since := time.Since(asked); since < d-d/64 || first.Err() != context.DeadlineExceeded {
		t.Fatalf("first context ended after %v with %v, want at least %v and a deadline", since, first.Err(), d-d/64)
	}
}
