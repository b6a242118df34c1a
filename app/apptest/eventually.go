package apptest

import (
	"testing"
	"time"
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
