package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// IdempotencyStore keeps Idempotency-Key records; models.Store implements it.
type IdempotencyStore interface {
	ClaimIdempotency(ctx context.Context, r models.ClaimRequest) (bool, *models.IdempotencyRecord, error)
	RenewIdempotencyLease(ctx context.Context, id, owner string, lease time.Duration) error
	CompleteIdempotency(ctx context.Context, id, owner string, c models.Completion, ttl time.Duration) error
	ReleaseIdempotency(ctx context.Context, id, owner, reason string, ttl time.Duration) error
	MarkIdempotencyReplayed(ctx context.Context, id string) error
	MarkIdempotencyJoined(ctx context.Context, id string, n int) error
	IdempotencyBodyChunk(ctx context.Context, id string, attempt int, off, n int64) ([]byte, error)
}

// ReplayedHeader marks a response answered from a stored record.
const ReplayedHeader = "Idempotent-Replayed"

var (
	errKeyInvalid = &handlers.APIError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "invalid_idempotency_key", Outcome: models.OutcomeIdempotencyInvalid,
		Message: "The Idempotency-Key header must be 1 to 255 printable ASCII characters, bare or as a quoted string, and sent once."}
	errBuffersFull = &handlers.APIError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "proxy_overloaded", Outcome: models.OutcomeRejected,
		Message: "The proxy is at its memory limit (BUFFER_MEMORY_LIMIT); retry shortly."}
	errKeyMismatch = &handlers.APIError{Status: http.StatusUnprocessableEntity, Type: "invalid_request_error", Code: "idempotency_key_reused", Outcome: models.OutcomeIdempotencyMismatch,
		Message: "This Idempotency-Key was already used for a different request (method, path, query or body). Use a new key for a new request."}
	errKeyInProgress = &handlers.APIError{Status: http.StatusConflict, Type: "invalid_request_error", Code: "idempotency_key_in_progress", Outcome: models.OutcomeIdempotencyConflict,
		Message: "A request with this Idempotency-Key is still in progress. Retry after it completes."}
	errKeyNotStored = &handlers.APIError{Status: http.StatusGone, Type: "invalid_request_error", Code: "idempotency_response_not_stored", Outcome: models.OutcomeIdempotencyGone,
		Message: "The request with this Idempotency-Key was executed, but its response was larger than IDEMPOTENCY_MAX_BODY and cannot be replayed. Use a new key to run it again."}
	errKeyUnavailable = &handlers.APIError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "idempotency_unavailable", Outcome: models.OutcomeIdempotencyDown,
		Message: "The idempotency store is unavailable, so the request was not executed. Retry later, or send it without Idempotency-Key."}
)

// handleKeyed runs a POST or PATCH that carries an Idempotency-Key (its
// fields as received): at most once upstream, and every repeat answered
// from the stored record.
func (p *Proxy) handleKeyed(c *fiber.Ctx, ex *exchange, fields [][]byte) error {
	key, ok := parseIdempotencyKey(fields)
	if !ok {
		p.out.metrics.idempotencyResult("invalid")
		return ex.reject(c, errKeyInvalid)
	}
	ex.rec.IdempotencyKey = key
	fingerprint, cleanup, err := requestFingerprint(c, ex.rec.Path)
	defer cleanup()
	if err != nil {
		if ex.bodyLimit != nil && ex.bodyLimit.exceeded {
			lingerAndClose(c)
			return ex.reject(c, handlers.ErrBodyTooLarge)
		}
		return ex.reject(c, &handlers.APIError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "invalid_body", Outcome: models.OutcomeRejected,
			Message: "The request body could not be read."})
	}
	// The first share of memory for the capture (or a replay), before any
	// claim, so that a proxy at its memory bound refuses new work cleanly.
	if !p.buffers.acquire(captureStep, admitWait) {
		c.Set(fiber.HeaderRetryAfter, "1")
		return ex.reject(c, errBuffersFull)
	}
	reserved := int64(captureStep)
	defer func() { p.buffers.release(reserved) }() // what no claim or replay took over
	id := scopeID(ex.rec.Client, key)
	owner := randomToken()
	pending := p.claims.expect(id, owner)
	defer func() {
		if ex.claim == nil {
			p.claims.forget(pending)
		}
	}()
	for tries := 0; ; tries++ {
		claimed, rec, err := p.idem.ClaimIdempotency(p.claimTimeout.context(), models.ClaimRequest{
			ID: id, Client: ex.rec.Client, Method: ex.rec.Method, Path: p.out.mask.String(ex.rec.Path), Key: p.out.mask.String(key),
			Fingerprint: fingerprint, Owner: owner, Stream: ex.rec.Stream,
			Lease: p.cfg.IdempotencyLease, TTL: p.cfg.IdempotencyTTL,
		})
		switch {
		case err != nil:
			p.warnSometimes.Do(func() { p.out.logger.Warn("idempotency store unavailable", "error", err.Error()) })
			p.out.metrics.idempotencyResult("unavailable")
			return ex.reject(c, errKeyUnavailable)
		case claimed:
			if rec != nil { // displaced a holder whose lease had lapsed
				p.out.metrics.idempotencyResult("taken_over")
				p.out.logger.Info("idempotency key taken over after its lease lapsed", "key_id", id)
			}
			p.out.metrics.idempotencyResult("executed")
			row := ex.rec
			p.out.maskRecord(&row) // logged as it is if a shutdown cuts the request
			ex.claim = p.claims.hold(pending, row, ex.start, reserved)
			reserved = 0
			return p.forward(c, ex)
		case rec.Fingerprint != fingerprint:
			// Checked before the state: a different request with the key is a
			// client error to correct (422) even while the first one runs; the
			// draft's 409 means "retry unchanged", which would not help.
			p.out.metrics.idempotencyResult("mismatch")
			return ex.reject(c, errKeyMismatch)
		case rec.State == models.StateCompleted && !rec.Replayable:
			p.out.metrics.idempotencyResult("gone")
			return ex.reject(c, errKeyNotStored)
		case rec.State == models.StateCompleted:
			p.out.metrics.idempotencyResult("replayed")
			reserved = 0
			return p.replay(c, ex, rec, captureStep)
		case p.cfg.IdempotencyJoinWait > 0 && tries < 3:
			if joined, err := p.join(c, ex, rec); joined {
				return err
			}
			// The attempt ended as we looked: its record tells the rest.
		default:
			p.out.metrics.idempotencyResult("conflict")
			c.Set(fiber.HeaderRetryAfter, "1")
			return ex.reject(c, errKeyInProgress)
		}
	}
}

// replay answers from a stored record: same status, stored headers and the
// identical body bytes, SSE streams included. The body is read from the
// store a piece at a time as the client takes it, so a client that reads
// slowly holds one piece (reserved bytes of BUFFER_MEMORY_LIMIT), not the
// record.
func (p *Proxy) replay(c *fiber.Ctx, ex *exchange, rec *models.IdempotencyRecord, reserved int64) error {
	var headers map[string]string
	_ = json.Unmarshal([]byte(rec.Headers), &headers)
	for k, v := range headers {
		c.Set(k, v)
	}
	c.Set(ReplayedHeader, "true")
	c.Status(rec.Status)
	body := &replayBody{store: p.idem, buffers: p.buffers, id: rec.ID, attempt: rec.Attempts, size: rec.BodySize, reserved: reserved}
	c.Response().SetBodyStream(body, int(rec.BodySize))
	ex.status, ex.outcome, ex.respBytes = rec.Status, models.OutcomeReplayed, rec.BodySize
	ex.rec.Stream = rec.Stream
	ex.finish(nil)
	p.background.Add(1)
	go func() {
		defer p.background.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := p.idem.MarkIdempotencyReplayed(ctx, rec.ID); err != nil {
			p.out.logger.Warn("count idempotency replay", "error", err.Error())
		}
	}()
	return nil
}

// replayBody streams a stored body from the database in pieces.
type replayBody struct {
	store       IdempotencyStore
	buffers     *bufferBudget
	id          string
	attempt     int // the record version being replayed
	size, off   int64
	pending     []byte
	reserved    int64
	releaseOnce sync.Once
}

func (r *replayBody) Read(b []byte) (int, error) {
	if len(r.pending) == 0 {
		if r.off >= r.size {
			return 0, io.EOF
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		chunk, err := r.store.IdempotencyBodyChunk(ctx, r.id, r.attempt, r.off, min(replayChunk, r.size-r.off))
		cancel()
		if err != nil || len(chunk) == 0 {
			// Expired, deleted or unreadable mid-replay: cut the response
			// (its Content-Length tells the client) rather than end it early.
			return 0, errReplayCut
		}
		r.pending, r.off = chunk, r.off+int64(len(chunk))
	}
	n := copy(b, r.pending)
	r.pending = r.pending[n:]
	return n, nil
}

// Close is called by fasthttp once the body is written, or failed to be.
func (r *replayBody) Close() error {
	r.releaseOnce.Do(func() { r.buffers.release(r.reserved) })
	return nil
}

var errReplayCut = errors.New("idempotency record went away during its replay")

// releasable lists the upstream statuses after which a retry should
// execute again: our own configuration (401, 403), timeouts and conflicts
// (408, 409, 425), rate limits (429) and every server error.
func releasable(status int) bool {
	switch status {
	case 401, 403, 408, 409, 425, 429:
		return true
	}
	return status >= 500
}

// storable lists what the README promises to store: 2xx and the
// deterministic 4xx. Informational answers and redirects (101, 302, 304)
// are not the result of the call, so they are released too.
func storable(status int) bool {
	return (status >= 200 && status < 300) || (status >= 400 && status < 500 && !releasable(status))
}
