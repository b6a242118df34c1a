package handlers

import (
	"errors"
	"io"
	"sync"
	"time"

	"github.com/valyala/fasthttp"
)

// The upstream client is Fiber's proxy middleware driving a dedicated
// fasthttp.Client with StreamResponseBody and this Transport. The Transport
// sees every upstream response before Fiber does: it reads the response
// into a response of its own (sendUpstream) and hands Fiber a teeing body
// stream, so the body reaches the client chunk by chunk (fasthttp flushes
// after each Read) while the exchange counts bytes, reads usage, and
// captures keyed responses for replay.

// exchangeKey carries the *exchange on the fasthttp.Request.
type exchangeKey struct{}

type teeTransport struct{}

func (teeTransport) RoundTrip(hc *fasthttp.HostClient, req *fasthttp.Request, resp *fasthttp.Response) (bool, error) {
	ex, ok := req.UserValue(exchangeKey{}).(*exchange)
	if !ok {
		return false, errors.New("proxy: request without an exchange")
	}
	tmp := fasthttp.AcquireResponse()
	tmp.StreamBody = resp.StreamBody
	tmp.SkipBody = resp.SkipBody
	release, err := sendUpstream(hc, req, tmp, ex)
	if err != nil {
		fasthttp.ReleaseResponse(tmp)
		return false, err // retries, where safe, happened in sendUpstream
	}
	tmp.Header.CopyTo(&resp.Header)
	cleanResponseHeaders(&resp.Header)
	src, decoder, err := ex.p.identityBody(tmp, &resp.Header)
	if err != nil {
		fasthttp.ReleaseResponse(tmp)
		release(false)
		return false, err
	}
	if ex.p.maskHeaders(&resp.Header) {
		ex.p.logger.Warn("upstream echoed a secret in a response header; masked")
	}
	ex.onHeaders(&resp.Header)
	if src == nil {
		// HEAD, 204 and 304 carry no body stream.
		body := ex.p.mask.Bytes(tmp.Body())
		resp.SetBody(body)
		ex.observe(body)
		ex.bodyComplete()
		fasthttp.ReleaseResponse(tmp)
		ex.finish(nil)
		return false, nil
	}
	size := resp.Header.ContentLength()
	if size < 0 {
		size = -1
	}
	// Every byte the client, the capture, the log or a page will see has
	// passed the mask: an upstream that echoes a key sends it nowhere.
	t := &tee{src: ex.p.mask.Reader(src), decoder: decoder, release: release, tmp: tmp, ex: ex, size: int64(size)}
	if tmp.StatusCode() >= 400 {
		// Error bodies are small: read them whole, so a key echoed
		// in one is masked before anything is sent.
		resp.SetBody(ex.p.errorBody(t))
		return false, nil
	}
	resp.SetBodyStream(t, size)
	return false, nil
}

// tee is the body stream Fiber writes to the client. It implements only
// CloseWithError (not Close): fasthttp calls both when both exist.
type tee struct {
	src     io.Reader // the upstream body (decoded, masked), on the connection
	decoder io.Closer // nil unless the upstream body was encoded
	release func(reuse bool)
	tmp     *fasthttp.Response
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
		t.ex.endWatch() // from here on a write to a gone client fails
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
	// Complete the exchange before the client can see the body end, so a
	// client that retries the instant it has the full answer finds the
	// idempotency record already stored.
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
			t.ex.p.background.Add(1)
			go func() {
				defer t.ex.p.background.Done()
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
	t.ex.upstream.extendDeadline(drainGrace)
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
	t.ex.endWatch()
	if err == nil && !t.eof {
		err = io.ErrUnexpectedEOF
	}
	// The connection is pooled again only after a clean, complete body;
	// otherwise it is closed, which is how an abandoned unkeyed request
	// cancels the upstream call.
	if t.decoder != nil {
		_ = t.decoder.Close()
	}
	fasthttp.ReleaseResponse(t.tmp)
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
