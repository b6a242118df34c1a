package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// LiveStore carries running attempts between replicas: models.Store on
// PostgreSQL.
type LiveStore interface {
	Shared() bool
	PublishLive(ctx context.Context, id, owner string, off int64, data []byte) error
	LiveChunks(ctx context.Context, id, owner string, from int64) ([]models.LiveChunk, error)
	AskToPublish(ctx context.Context, id string) error
	DeleteLive(ctx context.Context, id, owner string) error
	IdempotencyAttempt(ctx context.Context, id string) (models.AttemptState, error)
	Listen(ctx context.Context, l models.Listener)
}

// relay lets a repeat that lands on another replica than its key's
// attempt join it. Nothing is written while nobody follows: a follower
// asks (NOTIFY idempotency_join), the holder then publishes the attempt's
// head, its body so far and then each new piece, batched every
// publishEvery, and its end, into idempotency_live, waking followers with
// NOTIFY idempotency_live. On each following replica one mirror per
// attempt reads the rows into a feed that all its joiners share. A lost
// notification costs at most pollEvery; a holder that dies is noticed by
// its lease lapsing.
type relay struct {
	ctx     context.Context
	store   LiveStore
	idem    IdempotencyStore // completed bodies
	claims  *claims
	buffers *bufferBudget
	logger  *slog.Logger
	warn    rate.Sometimes

	mu         sync.Mutex
	mirrors    map[string]*mirror // by key id
	publishing map[*claim]bool
}

const (
	// publishEvery batches a followed attempt's pieces: at most this many
	// statements per second and stream, whatever its event rate.
	publishEvery = 25 * time.Millisecond
	// pollEvery is how often a mirror reads without a notification.
	pollEvery = 250 * time.Millisecond
	// checkEvery is how often a mirror without news checks the record
	// (completed, released, its holder's lease lapsed) and asks again.
	checkEvery = time.Second
	// liveKeep is how long published rows stay after the attempt ends,
	// for followers still reading them; the completed record holds the body.
	liveKeep = 10 * time.Second
)

func newRelay(ctx context.Context, store LiveStore, idem IdempotencyStore, cl *claims) *relay {
	r := &relay{ctx: ctx, store: store, idem: idem, claims: cl, buffers: cl.buffers, logger: cl.logger,
		warn: rate.Sometimes{Interval: time.Second}, mirrors: map[string]*mirror{}, publishing: map[*claim]bool{}}
	listening := make(chan struct{})
	var once sync.Once
	go store.Listen(ctx, models.Listener{
		Notify: r.notified,
		Connected: func() {
			once.Do(func() { close(listening) })
			r.mu.Lock()
			for _, m := range r.mirrors {
				m.wake()
			}
			r.mu.Unlock()
		},
		Failed: func(err error) { r.warnf("idempotency notifications: reconnecting", err) },
	})
	// Serve once this replica hears join requests, so one that arrives
	// just after start is not missed; a database that is slow to answer
	// only delays it (followers ask again).
	select {
	case <-listening:
	case <-time.After(2 * time.Second):
	}
	return r
}

func (r *relay) warnf(msg string, err error) {
	r.warn.Do(func() { r.logger.Warn(msg, "error", err.Error()) })
}

func (r *relay) notified(channel, id string) {
	switch channel {
	case models.ChannelJoin:
		r.claims.mu.Lock()
		cl := r.claims.live[id]
		r.claims.mu.Unlock()
		if cl == nil {
			return // not ours
		}
		r.mu.Lock()
		start := !r.publishing[cl]
		r.publishing[cl] = true
		r.mu.Unlock()
		if start {
			go r.publish(cl)
		}
	case models.ChannelLive:
		r.mu.Lock()
		if m := r.mirrors[id]; m != nil {
			m.wake()
		}
		r.mu.Unlock()
	}
}

// liveEnd is the end row of an attempt.
type liveEnd struct {
	End     feedEnd            `json:"end"`
	Failure *handlers.APIError `json:"failure,omitempty"`
}

// publish writes a followed attempt of this replica to the store as it
// flows, until it ends; then, after liveKeep, deletes what it wrote.
func (r *relay) publish(cl *claim) {
	defer func() {
		r.mu.Lock()
		delete(r.publishing, cl)
		r.mu.Unlock()
	}()
	f := &cl.feed
	if !f.join(false) {
		return // over and stored: followers find the record
	}
	left := false
	leave := func() {
		if !left {
			left = true
			f.leave()
		}
	}
	defer leave()
	write := func(off int64, data []byte) bool {
		ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
		defer cancel()
		if err := r.store.PublishLive(ctx, cl.id, cl.owner, off, data); err != nil {
			r.warnf("publish a running response", err)
			return false
		}
		return true
	}
	headSent, off, last := false, 0, time.Time{}
	for r.ctx.Err() == nil {
		st, _ := f.await(time.Now().Add(time.Hour), func(st feedState) bool {
			return (!headSent && st.head != nil) || st.size > off || st.end != feedOpen
		})
		if wait := publishEvery - time.Since(last); st.end == feedOpen && wait > 0 {
			select { // gather what comes meanwhile into one row
			case <-time.After(wait):
			case <-r.ctx.Done():
				return
			}
			st = f.state()
		}
		last = time.Now()
		if !headSent && st.head != nil {
			head, _ := json.Marshal(st.head)
			headSent = write(models.LiveHead, head)
		}
		if piece := f.slice(off, st.size); len(piece) > 0 && write(int64(off), piece) {
			off += len(piece)
		}
		if st.end != feedOpen && (st.end == feedLost || off >= st.size) {
			end, _ := json.Marshal(liveEnd{End: st.end, Failure: st.failure})
			write(models.LiveEnd, end)
			break
		}
	}
	leave()
	select {
	case <-time.After(liveKeep):
	case <-r.ctx.Done():
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.store.DeleteLive(ctx, cl.id, cl.owner); err != nil {
		r.warnf("delete a running response", err) // the sweeper removes it later
	}
}

// slice is the published body from off to size, shared, not copied: those
// bytes never change.
func (f *feed) slice(off, size int) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	size = min(size, len(f.body))
	if off >= size {
		return nil
	}
	return f.body[off:size:size]
}

// mirror is one replica's copy of an attempt held on another, shared by
// the joiners there.
type mirror struct {
	feed      feed
	id, owner string
	attempts  int
	poke      chan struct{}
	reserved  int64 // of BUFFER_MEMORY_LIMIT, for the body
	// over counts checks that found the attempt released or its lease
	// lapsed: the holder settles the record before it publishes the end,
	// so the first such finding waits for the end row one round more.
	over int
}

func (m *mirror) wake() {
	select {
	case m.poke <- struct{}{}:
	default:
	}
}

// follow joins the attempt rec describes through a mirror of it.
func (r *relay) follow(rec *models.IdempotencyRecord) (*feed, func()) {
	r.mu.Lock()
	m := r.mirrors[rec.ID]
	if m == nil || m.owner != rec.Owner {
		m = &mirror{id: rec.ID, owner: rec.Owner, attempts: rec.Attempts, poke: make(chan struct{}, 1)}
		r.mirrors[rec.ID] = m
		go r.mirror(m)
	}
	r.mu.Unlock()
	if !m.feed.join(true) {
		return nil, nil
	}
	return &m.feed, m.feed.leave
}

// mirror fills m's feed from the store until the attempt ends.
func (r *relay) mirror(m *mirror) {
	defer func() {
		r.mu.Lock()
		if r.mirrors[m.id] == m {
			delete(r.mirrors, m.id)
		}
		r.mu.Unlock()
		m.feed.whenIdle(func() {
			r.buffers.release(m.reserved)
			r.claims.countJoins(m.id, m.feed.joined())
		})
	}()
	call := func(fn func(ctx context.Context) error) error {
		ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
		defer cancel()
		return fn(ctx)
	}
	off, asked, checked, asks := 0, time.Time{}, time.Now(), 0
	fresh := true // until a read succeeds: what the first one finds was there before we asked
	for {
		// Ask at once, again soon (a holder whose listener was
		// reconnecting), then every checkEvery while nothing comes.
		if time.Since(asked) >= min(checkEvery, time.Duration(asks)*pollEvery) {
			asked, asks = time.Now(), asks+1
			if err := call(func(ctx context.Context) error { return r.store.AskToPublish(ctx, m.id) }); err != nil {
				r.warnf("ask to publish a running response", err)
			}
		}
		var rows []models.LiveChunk
		err := call(func(ctx context.Context) (err error) {
			rows, err = r.store.LiveChunks(ctx, m.id, m.owner, int64(off))
			return err
		})
		if err != nil {
			r.warnf("follow a running response", err)
		} else if fresh {
			fresh = false
			if n := len(rows); n > 0 && rows[n-1].Off == models.LiveEnd {
				m.feed.ended(feedOver, nil)
				return
			}
		}
		progress := false
		for _, row := range rows {
			switch {
			case row.Off == models.LiveHead:
				var h feedHead
				if json.Unmarshal(row.Data, &h) == nil {
					m.feed.answered(h)
				}
			case row.Off == models.LiveEnd:
				var e liveEnd
				_ = json.Unmarshal(row.Data, &e)
				m.feed.ended(knownEnd(e.End), e.Failure)
				return
			case row.Off == int64(off):
				if !r.grow(m, row.Data) {
					m.feed.ended(feedCut, nil)
					return
				}
				off += len(row.Data)
				progress = true
			}
		}
		if progress {
			asked, checked = time.Now(), time.Now() // the holder publishes: no need to ask
		}
		if time.Since(checked) >= checkEvery {
			checked = time.Now()
			if r.settled(m, &off) {
				return
			}
		}
		select {
		case <-m.poke:
		case <-time.After(pollEvery):
		case <-r.ctx.Done():
			m.feed.ended(feedCut, nil)
			return
		}
	}
}

// knownEnd keeps a known end and cuts on anything else.
func knownEnd(e feedEnd) feedEnd {
	if e == feedClean || e == feedLost {
		return e
	}
	return feedCut
}

// settled checks the record of a mirrored attempt that sent no news, and
// ends the mirror if the attempt is over: completed (the rest is read from
// the record), released, taken over, or its holder's lease lapsed.
func (r *relay) settled(m *mirror, off *int) bool {
	ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
	st, err := r.store.IdempotencyAttempt(ctx, m.id)
	cancel()
	switch {
	case errors.Is(err, models.ErrNotFound) || (err == nil && st.Attempts != m.attempts):
		m.feed.ended(feedCut, nil)
		return true
	case err != nil:
		r.warnf("follow a running response", err)
		return false
	case st.State == models.StateCompleted:
		r.finishFromRecord(m, &st.IdempotencyRecord, off)
		return true
	case st.State == models.StateReleased || st.Lapsed:
		if m.over++; m.over < 2 {
			return false
		}
		m.feed.ended(feedCut, nil)
		return true
	}
	return false
}

// finishFromRecord completes a mirror from the stored record: the same
// bytes a replay sends.
func (r *relay) finishFromRecord(m *mirror, rec *models.IdempotencyRecord, off *int) {
	if !rec.Replayable {
		m.feed.ended(feedLost, nil)
		return
	}
	var headers map[string]string
	_ = json.Unmarshal([]byte(rec.Headers), &headers)
	m.feed.answered(feedHead{Status: rec.Status, Headers: headers, SSE: rec.Stream})
	for int64(*off) < rec.BodySize {
		ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
		piece, err := r.idem.IdempotencyBodyChunk(ctx, m.id, rec.Attempts, int64(*off), min(replayChunk, rec.BodySize-int64(*off)))
		cancel()
		if err != nil || len(piece) == 0 || !r.grow(m, piece) {
			m.feed.ended(feedCut, nil)
			return
		}
		*off += len(piece)
	}
	m.feed.ended(feedClean, nil)
}

// grow appends a piece to a mirror's body within BUFFER_MEMORY_LIMIT; the
// body moves to a larger buffer when full (readers see one or the other,
// both holding the same bytes).
func (r *relay) grow(m *mirror, piece []byte) bool {
	f := &m.feed
	f.mu.Lock()
	body := f.body
	f.mu.Unlock()
	need := len(body) + len(piece)
	if need > cap(body) {
		size := max(need, 2*cap(body), 64<<10)
		if !r.buffers.acquire(int64(size-cap(body)), 0) {
			r.warnf("follow a running response", errors.New("BUFFER_MEMORY_LIMIT reached"))
			return false
		}
		m.reserved += int64(size - cap(body))
		grown := make([]byte, len(body), size)
		copy(grown, body)
		body = grown
	}
	f.grew(append(body, piece...))
	return true
}
