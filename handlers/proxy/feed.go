package proxy

import (
	"sync"
	"time"

	"github.com/openai-idempotent-proxy/proxy/handlers"
)

// feed is a running keyed attempt's response as it is produced, for the
// repeats of the request that join it instead of getting 409: upstream's
// status and the replayed headers once it answers, the body so far, and
// how the attempt ended. The body only grows: bytes once published never
// change, so every joiner, at its own pace, reads exactly what the
// attempt's client got and what a later replay sends. On the holder's
// replica the feed is the attempt's capture itself (claim.go); a replica
// following an attempt held elsewhere fills one from the database
// (follow.go).
type feed struct {
	mu      sync.Mutex
	head    *feedHead // nil until upstream answers
	body    []byte
	end     feedEnd
	failure *handlers.APIError // the attempt failed before any response: what its client got
	wake    chan struct{}      // closed at each change; nil while nobody waits
	readers int
	joins   int      // repeats that joined, for the record's join_count
	idle    []func() // run once the feed has ended and its last reader left
	idled   bool
}

// feedHead is what a joiner needs to start its response.
type feedHead struct {
	Status  int               `json:"status"`
	Headers map[string]string `json:"headers"`
	SSE     bool              `json:"sse"`
}

// feedEnd is how the attempt ended, as its joiners must end.
type feedEnd int

const (
	feedOpen  feedEnd = iota
	feedClean         // the whole response passed: joiners end cleanly too
	feedCut           // the attempt broke off: joiners are cut, so their clients retry
	feedLost          // the capture was given up (too large, no memory): nothing to follow
	// feedOver: the attempt had ended before this replica followed it (a
	// mirror's first read found its end). The store has, or is about to
	// have, its outcome: a repeat asks it again rather than share an end it
	// did not follow, which may be a failure given back (released) while
	// the release was not yet written.
	feedOver
)

// changed wakes whoever waits; f.mu is held.
func (f *feed) changed() {
	if f.wake != nil {
		close(f.wake)
		f.wake = nil
	}
}

// waitChan is closed at the next change; f.mu is held.
func (f *feed) waitChan() <-chan struct{} {
	if f.wake == nil {
		f.wake = make(chan struct{})
	}
	return f.wake
}

// answered records upstream's status and headers.
func (f *feed) answered(h feedHead) {
	f.mu.Lock()
	if f.end == feedOpen && f.head == nil {
		f.head = &h
		f.changed()
	}
	f.mu.Unlock()
}

// grew publishes the body so far. body extends what was published before.
func (f *feed) grew(body []byte) {
	f.mu.Lock()
	if f.end == feedOpen {
		f.body = body
		f.changed()
	}
	f.mu.Unlock()
}

// ended records how the attempt ended, once; failure is what the client
// got when the attempt failed before any response.
func (f *feed) ended(end feedEnd, failure *handlers.APIError) {
	f.mu.Lock()
	if f.end != feedOpen {
		f.mu.Unlock()
		return
	}
	f.end, f.failure = end, failure
	if end == feedLost {
		f.body = nil
	}
	f.changed()
	run := f.becameIdle()
	f.mu.Unlock()
	for _, fn := range run {
		fn()
	}
}

// join adds a reader; false once the feed is over and forgotten (its
// record is in the store by then). joiner counts it as a repeat that
// joined (the relay's publisher reads the feed too).
func (f *feed) join(joiner bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.idled {
		return false
	}
	f.readers++
	if joiner {
		f.joins++
	}
	return true
}

// joined is how many repeats joined; final once the feed is idle.
func (f *feed) joined() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.joins
}

// leave removes a reader.
func (f *feed) leave() {
	f.mu.Lock()
	f.readers--
	run := f.becameIdle()
	f.mu.Unlock()
	for _, fn := range run {
		fn()
	}
}

// whenIdle runs fn once the feed has ended and no reader is left: the
// memory the body holds is given back only then.
func (f *feed) whenIdle(fn func()) {
	f.mu.Lock()
	f.idle = append(f.idle, fn)
	run := f.becameIdle()
	f.mu.Unlock()
	for _, fn := range run {
		fn()
	}
}

// becameIdle takes the idle callbacks due now; f.mu is held.
func (f *feed) becameIdle() []func() {
	if f.end == feedOpen || f.readers > 0 || len(f.idle) == 0 {
		return nil
	}
	run := f.idle
	f.idle, f.idled = nil, true
	return run
}

// state is a consistent look at the feed.
type feedState struct {
	head    *feedHead
	size    int
	end     feedEnd
	failure *handlers.APIError
}

func (f *feed) state() feedState {
	f.mu.Lock()
	defer f.mu.Unlock()
	return feedState{head: f.head, size: len(f.body), end: f.end, failure: f.failure}
}

// await waits until done(state) holds or the deadline passes, and returns
// the last state seen.
func (f *feed) await(deadline time.Time, done func(feedState) bool) (feedState, bool) {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for {
		f.mu.Lock()
		st := feedState{head: f.head, size: len(f.body), end: f.end, failure: f.failure}
		if done(st) {
			f.mu.Unlock()
			return st, true
		}
		wake := f.waitChan()
		f.mu.Unlock()
		select {
		case <-wake:
		case <-timer.C:
			return f.state(), false
		}
	}
}

// read copies body bytes from off into p, waiting for them while the
// attempt runs. It returns 0 and the end once off has reached the end of
// a finished feed.
func (f *feed) read(p []byte, off int) (int, feedEnd) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for {
		if off < len(f.body) {
			return copy(p, f.body[off:]), feedOpen
		}
		if f.end != feedOpen {
			return 0, f.end
		}
		wake := f.waitChan()
		f.mu.Unlock()
		<-wake
		f.mu.Lock()
	}
}
