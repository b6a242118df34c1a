package handlers

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"hash"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// IdempotencyStore keeps Idempotency-Key records; models.Store implements it.
type IdempotencyStore interface {
	ClaimIdempotency(ctx context.Context, r models.ClaimRequest) (bool, *models.IdempotencyRecord, error)
	RenewIdempotencyLease(ctx context.Context, id, owner string, lease time.Duration) error
	CompleteIdempotency(ctx context.Context, id, owner string, c models.Completion, ttl time.Duration) error
	ReleaseIdempotency(ctx context.Context, id, owner, reason string, ttl time.Duration) error
	MarkIdempotencyReplayed(ctx context.Context, id string) error
	IdempotencyBodyChunk(ctx context.Context, id string, attempt int, off, n int64) ([]byte, error)
}

// ReplayedHeader marks a response answered from a stored record.
const ReplayedHeader = "Idempotent-Replayed"

var (
	errKeyInvalid = &APIError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "invalid_idempotency_key", Outcome: models.OutcomeIdempotencyInvalid,
		Message: "The Idempotency-Key header must be 1 to 255 printable ASCII characters, bare or as a quoted string, and sent once."}
	errBuffersFull = &APIError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "proxy_overloaded", Outcome: models.OutcomeRejected,
		Message: "The proxy is at its memory limit (BUFFER_MEMORY_LIMIT); retry shortly."}
	errKeyMismatch = &APIError{Status: http.StatusUnprocessableEntity, Type: "invalid_request_error", Code: "idempotency_key_reused", Outcome: models.OutcomeIdempotencyMismatch,
		Message: "This Idempotency-Key was already used for a different request (method, path, query or body). Use a new key for a new request."}
	errKeyInProgress = &APIError{Status: http.StatusConflict, Type: "invalid_request_error", Code: "idempotency_key_in_progress", Outcome: models.OutcomeIdempotencyConflict,
		Message: "A request with this Idempotency-Key is still in progress. Retry after it completes."}
	errKeyNotStored = &APIError{Status: http.StatusGone, Type: "invalid_request_error", Code: "idempotency_response_not_stored", Outcome: models.OutcomeIdempotencyGone,
		Message: "The request with this Idempotency-Key was executed, but its response was larger than IDEMPOTENCY_MAX_BODY and cannot be replayed. Use a new key to run it again."}
	errKeyUnavailable = &APIError{Status: http.StatusServiceUnavailable, Type: "server_error", Code: "idempotency_unavailable", Outcome: models.OutcomeIdempotencyDown,
		Message: "The idempotency store is unavailable, so the request was not executed. Retry later, or send it without Idempotency-Key."}
)

// claim is this attempt's hold on an idempotency key.
type claim struct {
	id, owner string
	headers   map[string]string
	capture   []byte
	reserved  int64 // bytes of BUFFER_MEMORY_LIMIT held for capture, until stored
	overflow  bool  // the response outgrew IDEMPOTENCY_MAX_BODY
	stop      chan struct{}
	stopOnce  sync.Once

	// row is the request's log row as it stood when the key was claimed,
	// and start its arrival: what a shutdown logs for an attempt it cuts.
	row   models.RequestLog
	start time.Time

	// mu guards the two flags below: the exchange and a shutdown may both
	// try to settle the claim, and exactly one of them does.
	mu         sync.Mutex
	settled    bool
	atShutdown bool // settled and logged by releaseInFlight
}

func (cl *claim) stopRenewal() { cl.stopOnce.Do(func() { close(cl.stop) }) }

// take makes the caller the one that settles the claim; false if it was
// settled already.
func (cl *claim) take(atShutdown bool) bool {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.settled {
		return false
	}
	cl.settled, cl.atShutdown = true, atShutdown
	return true
}

// claimSet holds the keyed attempts in flight on this replica, so that a
// shutdown can settle those still running when SHUTDOWN_GRACE ends.
type claimSet struct {
	mu sync.Mutex
	m  map[*claim]struct{}
}

func (s *claimSet) add(cl *claim) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[*claim]struct{}{}
	}
	s.m[cl] = struct{}{}
}

func (s *claimSet) remove(cl *claim) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.m, cl)
}

func (s *claimSet) all() []*claim {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*claim, 0, len(s.m))
	for cl := range s.m {
		out = append(out, cl)
	}
	return out
}

// releaseInFlight settles the keyed attempts still running when the
// shutdown grace has ended: the process exits next, which cuts them, so
// each key is released (reason "shutdown") and its request logged now,
// while the database and the log writer are still open. Without it the
// key stayed in progress until its lease lapsed, and its retry got 409
// for up to IDEMPOTENCY_LEASE. An attempt that settles itself first (it
// completed in the meantime) is left to do so.
func (p *Proxy) releaseInFlight() {
	for _, cl := range p.claims.all() {
		if !cl.take(true) {
			continue
		}
		p.claims.remove(cl)
		cl.stopRenewal()
		p.metrics.releasedClaim("shutdown")
		p.persist("release idempotency key at shutdown", func(ctx context.Context) error {
			return p.idem.ReleaseIdempotency(ctx, cl.id, cl.owner, "shutdown", p.cfg.IdempotencyTTL)
		}, nil) // the request still runs and owns its capture
		p.logger.Warn("idempotency key released at shutdown: the request was still running", "key_id", cl.id)
		if p.sink != nil {
			row := cl.row
			row.Outcome = models.OutcomeUpstreamError
			row.Error = "shutdown: still running when SHUTDOWN_GRACE ended; the key was released"
			row.DurationMs = time.Since(cl.start).Milliseconds()
			p.sink.Record(row)
		}
	}
}

// loggedAtShutdown reports whether a shutdown settled this exchange's claim
// and wrote its log row: the exchange must not log a second one.
func (ex *exchange) loggedAtShutdown() bool {
	cl := ex.claim
	if cl == nil {
		return false
	}
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.atShutdown
}

// handleKeyed runs a POST or PATCH that carries an Idempotency-Key: at most
// once upstream, and every repeat answered from the stored record.
func (p *Proxy) handleKeyed(c *fiber.Ctx, ex *exchange) error {
	key, ok := parseIdempotencyKey(idempotencyKeyFields(&c.Request().Header))
	if !ok {
		p.metrics.idempotencyResult("invalid")
		return ex.reject(c, errKeyInvalid)
	}
	ex.rec.IdempotencyKey = key
	fingerprint, cleanup, err := requestFingerprint(c, ex.rec.Path)
	defer cleanup()
	if err != nil {
		if ex.bodyLimit != nil && ex.bodyLimit.exceeded {
			lingerAndClose(c)
			return ex.reject(c, errBodyTooLarge)
		}
		return ex.reject(c, &APIError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "invalid_body", Outcome: models.OutcomeRejected,
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
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	claimed, rec, err := p.idem.ClaimIdempotency(ctx, models.ClaimRequest{
		ID: id, Client: ex.rec.Client, Method: ex.rec.Method, Path: p.mask.String(ex.rec.Path), Key: p.mask.String(key),
		Fingerprint: fingerprint, Owner: owner, Stream: ex.rec.Stream,
		Lease: p.cfg.IdempotencyLease, TTL: p.cfg.IdempotencyTTL,
	})
	cancel()
	switch {
	case err != nil:
		p.warnSometimes.Do(func() { p.logger.Warn("idempotency store unavailable", "error", err.Error()) })
		p.metrics.idempotencyResult("unavailable")
		return ex.reject(c, errKeyUnavailable)
	case claimed:
		if rec != nil { // displaced a holder whose lease had lapsed
			p.metrics.idempotencyResult("taken_over")
			p.logger.Info("idempotency key taken over after its lease lapsed", "key_id", id)
		}
		p.metrics.idempotencyResult("executed")
		ex.claim = &claim{id: id, owner: owner, stop: make(chan struct{}), row: ex.rec, start: ex.start, reserved: reserved}
		p.maskRecord(&ex.claim.row) // logged as it is if a shutdown cuts the request
		reserved = 0
		p.claims.add(ex.claim)
		go p.renewLease(ex.claim)
		return p.forward(c, ex)
	case rec.Fingerprint != fingerprint:
		// Checked before the state: a different request with the key is a
		// client error to correct (422) even while the first one runs; the
		// draft's 409 means "retry unchanged", which would not help.
		p.metrics.idempotencyResult("mismatch")
		return ex.reject(c, errKeyMismatch)
	case rec.State == models.StateCompleted && !rec.Replayable:
		p.metrics.idempotencyResult("gone")
		return ex.reject(c, errKeyNotStored)
	case rec.State == models.StateCompleted:
		p.metrics.idempotencyResult("replayed")
		reserved = 0
		return p.replay(c, ex, rec, captureStep)
	default:
		p.metrics.idempotencyResult("conflict")
		c.Set(fiber.HeaderRetryAfter, "1")
		return ex.reject(c, errKeyInProgress)
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
	body := &replayBody{p: p, id: rec.ID, attempt: rec.Attempts, size: rec.BodySize, reserved: reserved}
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
			p.logger.Warn("count idempotency replay", "error", err.Error())
		}
	}()
	return nil
}

// replayBody streams a stored body from the database in pieces.
type replayBody struct {
	p           *Proxy
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
		chunk, err := r.p.idem.IdempotencyBodyChunk(ctx, r.id, r.attempt, r.off, min(replayChunk, r.size-r.off))
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
	r.releaseOnce.Do(func() { r.p.buffers.release(r.reserved) })
	return nil
}

var errReplayCut = errors.New("idempotency record went away during its replay")

// renewLease keeps the claim alive while the attempt runs, so a long stream
// is never taken over by another replica.
func (p *Proxy) renewLease(cl *claim) {
	t := time.NewTicker(p.cfg.IdempotencyLease / 3)
	defer t.Stop()
	for {
		select {
		case <-cl.stop:
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(context.Background(), p.cfg.IdempotencyLease/3)
			err := p.idem.RenewIdempotencyLease(ctx, cl.id, cl.owner, p.cfg.IdempotencyLease)
			cancel()
			if errors.Is(err, models.ErrLeaseLost) {
				p.logger.Warn("idempotency lease lost to another attempt", "id", cl.id)
				return
			}
			if err != nil {
				p.logger.Warn("renew idempotency lease", "error", err.Error())
			}
		}
	}
}

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

// maxJSONCheck bounds how much of a compressed JSON body is decompressed
// to check it.
const maxJSONCheck = 64 << 20

// completeJSON tells whether a captured JSON body is whole. A body framed
// by closing the connection (no Content-Length, not chunked) and cut
// mid-way looks complete to the transport; it is not valid JSON. Codings
// other than gzip cannot be checked here and pass.
func completeJSON(body []byte, encoding string) bool {
	switch encoding {
	case "", "identity":
		return json.Valid(body)
	case "gzip":
		zr, err := gzip.NewReader(bytes.NewReader(body))
		if err != nil {
			return false
		}
		plain, err := io.ReadAll(io.LimitReader(zr, maxJSONCheck+1))
		if err != nil {
			return false // cut inside the gzip stream
		}
		return len(plain) > maxJSONCheck || json.Valid(plain)
	}
	return true
}

// settle stores or releases the claim once the body has ended (complete)
// or the exchange is over without it.
func (ex *exchange) settle(complete bool) {
	cl := ex.claim
	if !cl.take(false) {
		return
	}
	ex.p.claims.remove(cl)
	switch {
	case !storable(ex.status):
		ex.releaseNow("upstream_status_" + strconv.Itoa(ex.status))
	case cl.overflow:
		ex.store(models.Completion{Status: ex.status, Headers: storedHeaders(cl.headers), BodySize: ex.respBytes, Stream: ex.sse, Replayable: false})
	case !complete:
		ex.releaseNow("incomplete")
	case ex.sse && !ex.stream.Terminal():
		ex.releaseNow("stream_incomplete")
	case ex.json && !completeJSON(cl.capture, ex.encoding):
		ex.releaseNow("body_incomplete")
	default:
		ex.store(models.Completion{Status: ex.status, Headers: storedHeaders(cl.headers), Body: cl.capture, BodySize: ex.respBytes, Stream: ex.sse, Replayable: true})
	}
}

// release gives the key back unless the claim was already settled.
func (ex *exchange) release(reason string) {
	if !ex.claim.take(false) {
		return
	}
	ex.p.claims.remove(ex.claim)
	ex.releaseNow(reason)
}

func (ex *exchange) releaseNow(reason string) {
	p, cl := ex.p, ex.claim
	p.metrics.releasedClaim(reason)
	p.persist("release idempotency key", func(ctx context.Context) error {
		return p.idem.ReleaseIdempotency(ctx, cl.id, cl.owner, reason, p.cfg.IdempotencyTTL)
	}, cl.freeCapture)
}

func (ex *exchange) store(c models.Completion) {
	p, cl := ex.p, ex.claim
	p.persist("store idempotency response", func(ctx context.Context) error {
		return p.idem.CompleteIdempotency(ctx, cl.id, cl.owner, c, p.cfg.IdempotencyTTL)
	}, cl.freeCapture)
}

// freeCapture gives the capture's memory back once it is stored (or not).
func (cl *claim) freeCapture(p *Proxy) {
	cl.mu.Lock()
	n := cl.reserved
	cl.reserved = 0
	cl.mu.Unlock()
	p.buffers.release(n)
}

// persist writes an attempt's outcome. The first try is synchronous (the
// client sees the end of its response only after it), with a short
// deadline; if the database is down, the write is retried in the
// background for half a lease while the claim is still ours, so a brief
// outage or restart does not let the key execute again. Retries meanwhile
// get 409 and then the replay. Only if the database stays away longer does
// the lease lapse and the next retry execute.
func (p *Proxy) persist(what string, write func(ctx context.Context) error, done func(*Proxy)) {
	if done != nil {
		defer func() {
			if done != nil {
				done(p)
			}
		}()
	}
	try := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return write(ctx)
	}
	err := try()
	if err == nil || errors.Is(err, models.ErrLeaseLost) {
		return
	}
	p.warnSometimes.Do(func() { p.logger.Warn(what+": retrying in the background", "error", err.Error()) })
	p.background.Add(1)
	finish := done
	done = nil // the background retry holds what it writes until it is done
	go func() {
		defer p.background.Done()
		if finish != nil {
			defer finish(p)
		}
		deadline := time.Now().Add(p.cfg.IdempotencyLease / 2)
		for wait := 100 * time.Millisecond; time.Now().Add(wait).Before(deadline); wait = min(2*wait, 2*time.Second) {
			time.Sleep(wait)
			if err = try(); err == nil || errors.Is(err, models.ErrLeaseLost) {
				return
			}
		}
		p.logger.Error(what+": gave up; the key executes again once its lease lapses", "error", err.Error())
	}()
}

// parseIdempotencyKey accepts the draft's Structured Field string ("abc")
// and the bare form Stripe and the SDKs send (abc) as the same key: 1–255
// printable ASCII characters, in exactly one header.
func parseIdempotencyKey(values [][]byte) (string, bool) {
	if len(values) != 1 {
		return "", false
	}
	v := bytes.TrimSpace(values[0])
	if len(v) > 0 && v[0] == '"' {
		// A Structured Field string: it must be closed, with only \" and
		// \\ as escapes.
		if len(v) < 2 || v[len(v)-1] != '"' {
			return "", false
		}
		var out []byte
		inner := v[1 : len(v)-1]
		for i := 0; i < len(inner); i++ {
			ch := inner[i]
			switch {
			case ch == '\\':
				if i+1 >= len(inner) || (inner[i+1] != '"' && inner[i+1] != '\\') {
					return "", false
				}
				i++
				out = append(out, inner[i])
			case ch == '"':
				return "", false
			default:
				out = append(out, ch)
			}
		}
		v = out
	}
	if len(v) == 0 || len(v) > 255 {
		return "", false
	}
	for _, ch := range v {
		if ch < 0x20 || ch > 0x7e {
			return "", false
		}
	}
	return string(v), true
}

// scopeID names a key within its client's scope: two clients using the same
// key never share a record. Method and path are part of the fingerprint
// instead, so reusing a key on another endpoint is a 422, as with Stripe,
// rather than a silent second execution.
func scopeID(client, key string) string {
	h := sha256.New()
	for _, s := range []string{client, key} {
		h.Write([]byte(s))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil))
}

func randomToken() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// spoolMemory is how much of a streamed keyed body is held in memory before
// it spills to a temporary file.
const spoolMemory = 8 << 20

// requestFingerprint hashes method, path, query and body. A streamed body
// is spooled (memory, then a temporary file) so it can be hashed and still
// be sent upstream; cleanup removes the spool once the request is done.
func requestFingerprint(c *fiber.Ctx, path string) (string, func(), error) {
	cleanup := func() {}
	req := c.Request()
	var body io.ReadSeeker
	if req.IsBodyStream() {
		spool, size, done, err := spoolBody(req.BodyStream())
		if err != nil {
			done()
			return "", cleanup, err
		}
		cleanup = done
		req.SetBodyStream(spool, int(size))
		body = spool
	} else {
		body = bytes.NewReader(req.Body())
	}
	h := sha256.New()
	for _, s := range []string{string(req.Header.Method()), path, string(req.URI().QueryString())} {
		h.Write([]byte(s))
		h.Write([]byte{0})
	}
	if err := hashBody(h, string(req.Header.ContentType()), body); err != nil {
		return "", cleanup, err
	}
	if _, err := body.Seek(0, io.SeekStart); err != nil {
		return "", cleanup, err
	}
	return hex.EncodeToString(h.Sum(nil)), cleanup, nil
}

// hashBody writes the body's identity into h. For multipart/form-data the
// parsed parts are hashed (name, filename, content type, content digest),
// not the raw bytes: SDKs pick a new random boundary on every retry.
func hashBody(h hash.Hash, contentType string, body io.ReadSeeker) error {
	mt, params, _ := mime.ParseMediaType(contentType)
	if mt == "multipart/form-data" && params["boundary"] != "" {
		if sum, err := multipartDigest(body, params["boundary"]); err == nil {
			h.Write([]byte("multipart\x00"))
			h.Write(sum)
			return nil
		}
		if _, err := body.Seek(0, io.SeekStart); err != nil {
			return err
		}
	}
	h.Write([]byte("raw\x00"))
	_, err := io.Copy(h, body)
	return err
}

func multipartDigest(body io.Reader, boundary string) ([]byte, error) {
	h := sha256.New()
	mr := multipart.NewReader(body, boundary)
	for {
		part, err := mr.NextRawPart()
		if errors.Is(err, io.EOF) {
			return h.Sum(nil), nil
		}
		if err != nil {
			return nil, err
		}
		content := sha256.New()
		if _, err := io.Copy(content, part); err != nil {
			return nil, err
		}
		for _, s := range []string{part.FormName(), part.FileName(), partHeaders(part.Header)} {
			h.Write([]byte(s))
			h.Write([]byte{0})
		}
		h.Write(content.Sum(nil))
	}
}

// partHeaders renders a part's headers in a canonical order. Every part
// header counts (Content-Type, Content-Transfer-Encoding, …): each can
// change what the part means, and none varies between retries of one
// request; what SDKs do vary, the boundary, is in the request's
// Content-Type, not here. Content-Disposition is compared parsed, so
// quoting differences between encoders do not make another request.
func partHeaders(hdr textproto.MIMEHeader) string {
	keys := make([]string, 0, len(hdr))
	for k := range hdr {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		for _, v := range hdr[k] {
			v = strings.TrimSpace(v)
			if k == "Content-Disposition" {
				if d, params, err := mime.ParseMediaType(v); err == nil {
					if f := mime.FormatMediaType(d, params); f != "" {
						v = f
					}
				}
			}
			b.WriteString(k + ": " + v + "\n")
		}
	}
	return b.String()
}

// spoolBody copies a request body stream into memory, spilling to a
// temporary file past spoolMemory.
func spoolBody(r io.Reader) (io.ReadSeeker, int64, func(), error) {
	var buf bytes.Buffer
	n, err := io.Copy(&buf, io.LimitReader(r, spoolMemory+1))
	if err != nil {
		return nil, 0, func() {}, err
	}
	if n <= spoolMemory {
		return bytes.NewReader(buf.Bytes()), n, func() {}, nil
	}
	f, err := os.CreateTemp("", "proxy-body-*")
	if err != nil {
		return nil, 0, func() {}, err
	}
	done := func() { _ = f.Close(); _ = os.Remove(f.Name()) }
	if _, err := f.Write(buf.Bytes()); err != nil {
		return nil, 0, done, err
	}
	rest, err := io.Copy(f, r)
	if err != nil {
		return nil, 0, done, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, 0, done, err
	}
	// Hide Close: fasthttp closes a body stream that is an io.Closer when
	// the request is reset; the file is closed and removed by done.
	return struct{ io.ReadSeeker }{f}, n + rest, done, nil
}
