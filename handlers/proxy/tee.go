package proxy

import (
	"errors"
	"io"
	"sync"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/openai-idempotent-proxy/proxy/handlers/scrub"
)

// tee is the body stream Fiber writes to the client. It implements only
// CloseWithError (not Close): fasthttp calls both when both exist.
type tee struct {
	src     io.Reader // the upstream body (decoded, masked), on the connection
	decoder io.Closer // nil unless the upstream body was encoded
	release func(reuse bool)
	up      *fasthttp.Response // the upstream response the body belongs to
	ex      *exchange
	size    int64 // Content-Length, or -1
	n       int64
	eof     bool
	readErr error
	once    sync.Once
}

func (t *tee) Read(p []byte) (int, error) {
	n, err := t.src.Read(p)
	if n > 0 || err != nil {
		t.ex.hop.endWatch() // from here on a write to a gone client fails
	}
	if n > 0 {
		t.n += int64(n)
		t.ex.observe(p[:n])
	}
	switch {
	case errors.Is(err, io.EOF):
		t.eof = true
	case err != nil:
		t.readErr = err
	}
	// Complete the exchange before the client can see the body end.
	if t.eof || (t.size >= 0 && t.n >= t.size) {
		t.eof = true
		t.ex.bodyComplete()
	}
	return n, err
}

// CloseWithError is called once the server has written the body, or failed
// to: err is the client write error or the upstream read error.
func (t *tee) CloseWithError(err error) error {
	t.once.Do(func() {
		if err != nil && !t.eof && t.readErr == nil && t.ex.keepsRunningWithoutClient() {
			// A keyed request whose client went away: the client asked for
			// exactly-once and will retry, so the paid-for answer is read
			// to its end and stored for the retry to replay.
			t.ex.clientGone = true
			background := t.ex.claim.set.background
			background.Add(1)
			go func() {
				defer background.Done()
				t.close(t.drain())
			}()
			return
		}
		t.close(err)
	})
	return nil
}

// drain reads the rest of the upstream body without a client, bounded by
// the exchange's deadline (on the connection) and the capture limit.
func (t *tee) drain() error {
	// A client that stalled until the delivery bound leaves a call at its
	// deadline whose answer is often complete in the socket buffer: read it.
	t.ex.hop.upstream.extendDeadline(drainGrace)
	buf := make([]byte, 32<<10)
	for !t.eof {
		if t.ex.captureOverflow() {
			return errCaptureOverflow
		}
		if _, err := t.Read(buf); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
	}
	return nil
}

// drainGrace is how long a keyed call may still be read after its client
// left at the very end of UPSTREAM_TIMEOUT.
const drainGrace = 10 * time.Second

var errCaptureOverflow = errors.New("response larger than IDEMPOTENCY_MAX_BODY")

func (t *tee) close(err error) {
	t.ex.hop.endWatch()
	if err == nil && !t.eof {
		err = io.ErrUnexpectedEOF
	}
	// The connection is pooled again only after a clean, complete body;
	// otherwise it is closed, which is how an abandoned unkeyed request
	// cancels the upstream call.
	if t.decoder != nil {
		_ = t.decoder.Close()
	}
	scrub.Release(t.src) // nothing reads it after this
	fasthttp.ReleaseResponse(t.up)
	t.release(err == nil && t.eof)
	switch {
	case t.readErr != nil:
		t.ex.finish(t.readErr)
	case err != nil && !t.eof:
		t.ex.finish(&clientGoneError{err})
	default:
		t.ex.finish(nil)
	}
}

// clientGoneError wraps the write error that showed the client had left.
type clientGoneError struct{ err error }

func (e *clientGoneError) Error() string { return "client went away: " + e.err.Error() }
func (e *clientGoneError) Unwrap() error { return e.err }

// isClientGone reports whether err says the client left. errors.AsType
// needs no target variable, which errors.As would move to the heap on
// every request.
func isClientGone(err error) bool {
	_, ok := errors.AsType[*clientGoneError](err)
	return ok
}
