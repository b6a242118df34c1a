package proxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// errAttemptFailed answers a joiner whose attempt broke off before
// upstream answered, in a way that gave its own client no error to share
// (the holder's replica died, say): retryable, like a 502.
var errAttemptFailed = &handlers.APIError{Status: http.StatusBadGateway, Type: "server_error", Code: "upstream_error", Outcome: models.OutcomeJoined,
	Message: "The request with this Idempotency-Key failed upstream before it answered. Retry it: the next attempt executes."}

// join answers a repeat of a keyed request that is still running from that
// attempt, instead of 409: a stream gets everything produced so far at
// once and then the rest as it comes; any other answer is waited for (at
// most IDEMPOTENCY_JOIN_WAIT) and sent whole, as a replay would. The joiner
// never executes upstream, and ends the way the attempt's client did: cut
// where its response was cut, so its SDK retries. false: there is nothing
// to join here (the attempt ended meanwhile): claim again.
func (p *Proxy) join(c *fiber.Ctx, ex *exchange, rec *models.IdempotencyRecord) (bool, error) {
	f, leave := p.claims.follow(rec)
	if f == nil {
		return false, nil
	}
	deadline := ex.start.Add(p.cfg.IdempotencyJoinWait)
	st, ok := f.await(deadline, func(st feedState) bool { return st.head != nil || st.end != feedOpen })
	if ok && st.head != nil && !st.head.SSE {
		st, ok = f.await(deadline, func(st feedState) bool { return st.end != feedOpen })
	}
	if st.end == feedOver { // it ended before we followed: its record tells the rest
		leave()
		return false, nil
	}
	var refusal *handlers.APIError
	switch {
	case !ok:
		refusal = errKeyInProgress // still running at the bound: as without joining
		c.Set(fiber.HeaderRetryAfter, "1")
	case st.end == feedLost:
		refusal = errKeyNotStored
	case st.head == nil && st.failure != nil:
		refusal = st.failure
	case st.head == nil:
		refusal = errAttemptFailed
	}
	switch {
	case refusal == errKeyInProgress:
		leave()
		p.out.metrics.idempotencyResult("conflict")
		return true, ex.reject(c, refusal)
	case refusal != nil: // the attempt's own failure, shared
		leave()
		p.out.metrics.idempotencyResult("joined")
		ex.failure, ex.status, ex.outcome, ex.errText = refusal, refusal.Status, models.OutcomeJoined, "joined: "+refusal.Code
		ex.finish(nil)
		return true, handlers.WriteAPIError(c, refusal)
	}

	p.out.metrics.idempotencyResult("joined")
	for k, v := range st.head.Headers {
		c.Set(k, v)
	}
	c.Set(ReplayedHeader, "true")
	if st.head.SSE {
		c.Set("X-Accel-Buffering", "no")
		c.Set("Cache-Control", "no-cache")
	}
	c.Status(st.head.Status)
	ex.status, ex.outcome = st.head.Status, models.OutcomeJoined
	ex.rec.Stream = st.head.SSE
	size := -1 // a stream: its length is not known yet
	if st.end == feedClean {
		size = st.size
	}
	c.Response().SetBodyStream(&joinBody{feed: f, leave: leave, ex: ex}, size)
	return true, nil
}

// joinBody is a joiner's response body: the attempt's bytes from the
// start, read at the joiner's own pace.
type joinBody struct {
	feed  *feed
	leave func()
	ex    *exchange
	off   int
	cut   bool
	once  sync.Once
}

var errJoinCut = errors.New("the joined attempt broke off")

func (b *joinBody) Read(p []byte) (int, error) {
	n, end := b.feed.read(p, b.off)
	if n > 0 {
		if b.ex.firstByte.IsZero() {
			b.ex.firstByte = time.Now()
		}
		b.off += n
		b.ex.respBytes += int64(n)
		return n, nil
	}
	if end == feedClean {
		return 0, io.EOF
	}
	b.cut = true
	return 0, errJoinCut
}

// CloseWithError is called once the body is written, or failed to be.
func (b *joinBody) CloseWithError(err error) error {
	b.once.Do(func() {
		b.leave()
		switch {
		case b.cut:
			b.ex.errText = "joined attempt broke off after " + strconv.Itoa(b.off) + " bytes"
		case err != nil:
			b.ex.clientGone = true
			b.ex.errText = "client went away"
		}
		b.ex.finish(nil)
	})
	return nil
}

// follow finds the running attempt rec describes: this process's own, or
// one held on another replica, followed through the store. leave must be
// called once the caller is done with the feed. nil: nothing to follow.
func (s *claims) follow(rec *models.IdempotencyRecord) (*feed, func()) {
	if cl := s.liveClaim(rec.ID, rec.Owner); cl != nil {
		if cl.feed.join(true) {
			return &cl.feed, cl.feed.leave
		}
		return nil, nil
	}
	if s.relay != nil {
		return s.relay.follow(rec)
	}
	return nil, nil
}

// countJoins adds the repeats that joined an attempt to its record, in
// one statement once they are done: not one per joiner on the hot row.
func (s *claims) countJoins(id string, n int) {
	if n == 0 {
		return
	}
	s.background.Add(1)
	go func() {
		defer s.background.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.store.MarkIdempotencyJoined(ctx, id, n); err != nil {
			s.warn.Do(func() { s.logger.Warn("count idempotency joins", "error", err.Error()) })
		}
	}()
}
