package proxy

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// claims is what every Idempotency-Key claim of one proxy shares: the
// store, the lease and retention, the memory budget captures grow in, and
// the set of claims still running, which a shutdown settles.
type claims struct {
	store   IdempotencyStore
	ttl     time.Duration
	lease   time.Duration
	maxBody int64 // IDEMPOTENCY_MAX_BODY
	buffers *bufferBudget
	metrics *Metrics
	logger  *slog.Logger
	sink    LogSink // for the rows of attempts a shutdown cuts; nil: none
	// background counts writes retried after their request ended, and
	// keyed responses read to their end without their client.
	background   *sync.WaitGroup
	warn         *rate.Sometimes
	writeTimeout sharedTimeout // bounds each try of persist

	mu      sync.Mutex
	running map[*claim]struct{}
	// live holds each attempt of this process by key id until its outcome
	// is stored, for repeats to join (join.go); expected, by owner, the
	// claims being tried for in the store, so that a repeat that finds one
	// there the moment it is won can join it before hold moves it to live.
	live     map[string]*claim
	expected map[string]*claim
	// relay publishes and follows attempts across replicas; nil on a
	// store only this process uses (SQLite).
	relay *relay
	// renewing holds each claim whose lease is kept, with when it was
	// last renewed (or won); renewLoop says the one loop that renews
	// them all runs (renewLeases).
	renewing  map[*claim]time.Time
	renewLoop bool
}

// claimState is where a claim is in its life: running until exactly one
// of complete, release or a shutdown settles it.
type claimState int

const (
	claimRunning claimState = iota
	claimSettled
	claimSettledAtShutdown // released and logged by releaseInFlight
)

// claim is one attempt's hold on an idempotency key, and the capture of
// its response for replays.
type claim struct {
	set       *claims
	id, owner string
	headers   map[string]string
	capture   []byte
	overflow  bool // the response outgrew IDEMPOTENCY_MAX_BODY or the memory bound
	// feed is the capture as repeats of the request follow it.
	feed     feed
	stopOnce sync.Once

	// row is the request's log row as it stood when the key was claimed,
	// and start its arrival: what a shutdown logs for an attempt it cuts.
	row   models.RequestLog
	start time.Time

	// mu guards state and reserved: the exchange and a shutdown may both
	// try to settle the claim, and exactly one of them does.
	mu       sync.Mutex
	state    claimState
	reserved int64 // bytes of BUFFER_MEMORY_LIMIT held for capture, until stored
}

// expect registers the claim about to be tried for in the store, as owner;
// hold it once won, forget it otherwise.
func (s *claims) expect(id, owner string) *claim {
	cl := &claim{set: s, id: id, owner: owner}
	s.mu.Lock()
	if s.running == nil {
		s.running, s.live, s.expected, s.renewing = map[*claim]struct{}{}, map[string]*claim{}, map[string]*claim{}, map[*claim]time.Time{}
	}
	s.expected[owner] = cl
	s.mu.Unlock()
	return cl
}

// forget drops an expected claim its owner did not win: the store never
// named that owner, so no repeat can have joined it.
func (s *claims) forget(cl *claim) {
	s.mu.Lock()
	if s.expected[cl.owner] == cl {
		delete(s.expected, cl.owner)
	}
	s.mu.Unlock()
}

// hold makes an expected claim won in the store running, and keeps its
// lease renewed until it ends. row is the request's log row, start its
// arrival, reserved the memory already taken for its capture.
func (s *claims) hold(cl *claim, row models.RequestLog, start time.Time, reserved int64) *claim {
	cl.row, cl.start, cl.reserved = row, start, reserved
	s.mu.Lock()
	delete(s.expected, cl.owner)
	s.running[cl] = struct{}{}
	s.live[cl.id] = cl
	s.renewing[cl] = time.Now()
	if !s.renewLoop {
		s.renewLoop = true
		go s.renewLeases()
	}
	s.mu.Unlock()
	return cl
}

// take makes the caller the one that settles the claim; false if it was
// settled already.
func (cl *claim) take(to claimState) bool {
	cl.mu.Lock()
	if cl.state != claimRunning {
		cl.mu.Unlock()
		return false
	}
	cl.state = to
	cl.mu.Unlock()
	cl.set.mu.Lock()
	delete(cl.set.running, cl)
	cl.set.mu.Unlock()
	return true
}

// loggedAtShutdown reports whether a shutdown settled the claim and wrote
// its log row: the exchange must not log a second one.
func (cl *claim) loggedAtShutdown() bool {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.state == claimSettledAtShutdown
}

// complete stores the response for replays, unless the claim is settled.
func (cl *claim) complete(c models.Completion) {
	if !cl.take(claimSettled) {
		return
	}
	s := cl.set
	s.persist("store idempotency response", func(ctx context.Context) error {
		return s.store.CompleteIdempotency(ctx, cl.id, cl.owner, c, s.ttl)
	}, cl.stored)
}

// release gives the key back, so that a retry executes again, unless the
// claim is settled.
func (cl *claim) release(reason string) {
	if !cl.take(claimSettled) {
		return
	}
	s := cl.set
	s.metrics.releasedClaim(reason)
	s.unlist(cl)
	s.persist("release idempotency key", func(ctx context.Context) error {
		return s.store.ReleaseIdempotency(ctx, cl.id, cl.owner, reason, s.ttl)
	}, cl.stored)
}

// stored runs once the outcome is written (or given up on): new repeats
// find it in the store from now on, and the capture's memory is given back
// once the last joiner has read it.
func (cl *claim) stored() {
	s := cl.set
	s.unlist(cl)
	cl.feed.whenIdle(func() {
		cl.freeCapture()
		s.countJoins(cl.id, cl.feed.joined())
	})
}

// unlist takes cl out of live: no repeat joins it from now on. A released
// attempt is unlisted before its release is written, so that a repeat
// arriving meanwhile (the database slow or down, the write retried in the
// background) is not handed the failure it gave back as if it were stored:
// it gets 409 until the release is stored, then executes again.
func (s *claims) unlist(cl *claim) {
	s.mu.Lock()
	if s.live[cl.id] == cl {
		delete(s.live, cl.id)
	}
	s.mu.Unlock()
}

// liveClaim is this process's running attempt for the key id, if its
// owner is owner.
func (s *claims) liveClaim(id, owner string) *claim {
	s.mu.Lock()
	defer s.mu.Unlock()
	if cl := s.live[id]; cl != nil && cl.owner == owner {
		return cl
	}
	if cl := s.expected[owner]; cl != nil && cl.id == id {
		return cl
	}
	return nil
}

// end stops renewing the lease; the attempt is over.
func (cl *claim) end() {
	cl.stopOnce.Do(func() {
		cl.set.mu.Lock()
		delete(cl.set.renewing, cl)
		cl.set.mu.Unlock()
	})
}

// append adds response bytes to the capture, growing it within
// IDEMPOTENCY_MAX_BODY and BUFFER_MEMORY_LIMIT, or gives the capture up.
func (cl *claim) append(p []byte) {
	if cl.overflow {
		return
	}
	need := int64(len(cl.capture) + len(p))
	if need > cl.set.maxBody || (need > int64(cap(cl.capture)) && !cl.grow(need, false)) {
		cl.drop()
		return
	}
	cl.capture = append(cl.capture, p...)
	cl.feed.grew(cl.capture)
}

// expect sizes the capture for a response of a known length: one exact
// buffer, or none if it cannot be stored.
func (cl *claim) expect(size int64) {
	switch {
	case size > cl.set.maxBody:
		cl.drop()
	case size > 0 && !cl.grow(size, true):
		cl.drop()
	}
}

// grow makes room for need bytes, within BUFFER_MEMORY_LIMIT: it reserves
// what the larger buffer adds (waiting a little, which pauses this stream)
// and moves the capture into it. exact (the Content-Length is known)
// allocates need and no more; otherwise the buffer starts at firstCapture
// and at least doubles, so a long stream is copied a few times only.
func (cl *claim) grow(need int64, exact bool) bool {
	s := cl.set
	size := need
	if !exact {
		size = min(max(need, 2*int64(cap(cl.capture)), firstCapture), s.maxBody)
	}
	// The first captureStep is reserved when the key is claimed: a buffer
	// growing within it reserves nothing more.
	if more := size - cl.reserved; more > 0 {
		if !s.buffers.acquire(more, growWait) {
			s.logger.Warn("BUFFER_MEMORY_LIMIT reached: a keyed response is delivered but not stored; retries get 410", "key_id", cl.id)
			return false
		}
		cl.mu.Lock()
		cl.reserved = size
		cl.mu.Unlock()
	}
	grown := make([]byte, len(cl.capture), size)
	copy(grown, cl.capture)
	cl.capture = grown
	return true
}

// drop gives up storing the response (too large, or no memory): the
// attempt still counts as executed, so retries get 410.
func (cl *claim) drop() {
	cl.overflow, cl.capture = true, nil
	cl.feed.ended(feedLost, nil) // joiners have nothing left to follow
	cl.freeCapture()
}

// freeCapture gives the capture's memory back once it is stored (or not).
func (cl *claim) freeCapture() {
	cl.mu.Lock()
	n := cl.reserved
	cl.reserved = 0
	cl.mu.Unlock()
	cl.set.buffers.release(n)
}

// renewLeases keeps the leases of every running claim alive, so a long
// stream is never taken over by another replica: one loop for all of them
// (a request shorter than a quarter lease is never renewed), which ends
// when none is left. Each claim is renewed a quarter to a third of a lease
// after its last renewal; the renewals due at once run side by side, each
// bounded by a third of a lease.
func (s *claims) renewLeases() {
	tick := s.lease / 12
	t := time.NewTicker(tick)
	defer t.Stop()
	for range t.C {
		s.mu.Lock()
		if len(s.renewing) == 0 {
			s.renewLoop = false
			s.mu.Unlock()
			return
		}
		now := time.Now()
		var due []*claim
		for cl, at := range s.renewing {
			if now.Sub(at) >= s.lease/3-tick {
				due = append(due, cl)
				s.renewing[cl] = now
			}
		}
		s.mu.Unlock()
		var wg sync.WaitGroup
		for _, cl := range due {
			wg.Go(cl.renew)
		}
		wg.Wait()
	}
}

// renew extends the claim's lease once; a claim whose lease another
// attempt took is renewed no more.
func (cl *claim) renew() {
	s := cl.set
	ctx, cancel := context.WithTimeout(context.Background(), s.lease/3)
	err := s.store.RenewIdempotencyLease(ctx, cl.id, cl.owner, s.lease)
	cancel()
	if errors.Is(err, models.ErrLeaseLost) {
		s.logger.Warn("idempotency lease lost to another attempt", "id", cl.id)
		s.mu.Lock()
		delete(s.renewing, cl)
		s.mu.Unlock()
		return
	}
	if err != nil {
		s.logger.Warn("renew idempotency lease", "error", err.Error())
	}
}

// releaseInFlight settles the keyed attempts still running when the
// shutdown grace has ended: the process exits next, which cuts them, so
// each key is released (reason "shutdown") and its request logged now,
// while the database and the log writer are still open. Without it the
// key stayed in progress until its lease lapsed, and its retry got 409
// for up to IDEMPOTENCY_LEASE. An attempt that settles itself first (it
// completed in the meantime) is left to do so.
func (s *claims) releaseInFlight() {
	s.mu.Lock()
	running := make([]*claim, 0, len(s.running))
	for cl := range s.running {
		running = append(running, cl)
	}
	s.mu.Unlock()
	for _, cl := range running {
		if !cl.take(claimSettledAtShutdown) {
			continue
		}
		cl.end()
		s.metrics.releasedClaim("shutdown")
		s.unlist(cl)
		s.persist("release idempotency key at shutdown", func(ctx context.Context) error {
			return s.store.ReleaseIdempotency(ctx, cl.id, cl.owner, "shutdown", s.ttl)
		}, nil) // the request still runs and owns its capture
		s.logger.Warn("idempotency key released at shutdown: the request was still running", "key_id", cl.id)
		if s.sink != nil {
			row := cl.row
			row.Outcome = models.OutcomeUpstreamError
			row.Error = "shutdown: still running when SHUTDOWN_GRACE ended; the key was released"
			row.DurationMs = time.Since(cl.start).Milliseconds()
			s.sink.Record(row)
		}
	}
}

// persist writes an attempt's outcome. The first try is synchronous (the
// client sees the end of its response only after it), with a short
// deadline; if the database is down, the write is retried in the
// background for half a lease while the claim is still ours, so a brief
// outage or restart does not let the key execute again. Retries meanwhile
// get 409 and then the replay. Only if the database stays away longer does
// the lease lapse and the next retry execute. done, if not nil, runs once
// the write is over, whichever way.
func (s *claims) persist(what string, write func(ctx context.Context) error, done func()) {
	if done == nil {
		done = func() {}
	}
	try := func() error { return write(s.writeTimeout.context()) }
	err := try()
	if err == nil || errors.Is(err, models.ErrLeaseLost) {
		done()
		return
	}
	s.warn.Do(func() { s.logger.Warn(what+": retrying in the background", "error", err.Error()) })
	s.background.Add(1)
	go func() { // holds what it writes until it is done
		defer s.background.Done()
		defer done()
		deadline := time.Now().Add(s.lease / 2)
		for wait := 100 * time.Millisecond; time.Now().Add(wait).Before(deadline); wait = min(2*wait, 2*time.Second) {
			time.Sleep(wait)
			if err = try(); err == nil || errors.Is(err, models.ErrLeaseLost) {
				return
			}
		}
		s.logger.Error(what+": gave up; the key executes again once its lease lapses", "error", err.Error())
	}()
}
