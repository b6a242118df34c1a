package proxy

import (
	"context"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"
)

// bufferBudget caps the bytes the proxy holds in memory on behalf of
// requests, beyond fasthttp's own per-connection buffers: idempotency
// captures, replays and streamed JSON bodies read to learn their model
// (BUFFER_MEMORY_LIMIT). New work that cannot get its share in time is
// refused with 503 instead of risking an out-of-memory kill; work already
// running waits for memory (backpressure) and, past a bound, gives up the
// capture, never the client's answer.
type bufferBudget struct {
	sem   *semaphore.Weighted
	limit int64
	held  atomic.Int64 // for /metrics
}

func newBufferBudget(limit int64) *bufferBudget {
	return &bufferBudget{sem: semaphore.NewWeighted(limit), limit: limit}
}

// acquire reserves n bytes, waiting at most wait. A request for more than
// the whole budget can never be met.
func (b *bufferBudget) acquire(n int64, wait time.Duration) bool {
	if n <= 0 {
		return true
	}
	if n > b.limit {
		return false
	}
	if !b.sem.TryAcquire(n) {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		if b.sem.Acquire(ctx, n) != nil {
			return false
		}
	}
	b.held.Add(n)
	return true
}

func (b *bufferBudget) release(n int64) {
	if n > 0 {
		b.held.Add(-n)
		b.sem.Release(n)
	}
}

const (
	// admitWait is how long a new request may wait for its first share.
	admitWait = 5 * time.Second
	// growWait is how long a running capture may wait to grow; the stream
	// to its client pauses meanwhile.
	growWait = 5 * time.Second
	// captureStep is the first reservation of a keyed request, and the
	// smallest growth of that reservation.
	captureStep = 256 << 10
	// firstCapture is the first buffer of a capture whose length is not
	// known (a stream): most are short, and the buffer doubles as it fills,
	// within what is reserved.
	firstCapture = 16 << 10
	// replayChunk is how much of a stored body a replay holds at a time.
	replayChunk = 256 << 10
)
