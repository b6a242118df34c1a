package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"strings"

	"github.com/gofiber/fiber/v2"
	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/handlers/scrub"
	"github.com/valyala/fasthttp"
)

// maxErrorBody bounds how much of an upstream error body is read.
const maxErrorBody = 1 << 20

// errorBody reads an upstream error body (bounded) through the tee and
// ends the exchange.
func errorBody(t *tee) []byte {
	body, err := io.ReadAll(io.LimitReader(t, maxErrorBody))
	if err == nil && !t.eof {
		err = errErrorBodyTooLarge
	}
	if err != nil && t.readErr == nil {
		t.readErr = err
	}
	_ = t.CloseWithError(nil)
	return body
}

// wholeBody reads a body of known length (t.size) through the tee and ends
// the exchange; err says the upstream cut it short.
func wholeBody(t *tee) ([]byte, error) {
	body := make([]byte, t.size)
	_, err := io.ReadFull(t, body)
	if err == nil && !t.eof { // an empty body: the tee has not seen its end
		if _, err = t.Read(nil); errors.Is(err, io.EOF) {
			err = nil
		}
	}
	if err != nil && t.readErr == nil {
		t.readErr = err
	}
	_ = t.CloseWithError(err)
	return body, err
}

// maxDecoded bounds a decoded upstream body per coding stage; decoding
// holds no more memory than a read, so it only stops endless bombs.
const maxDecoded = 1 << 36

// identityBody returns the upstream body to read: decoded if the upstream
// compressed it (it was not asked to: Accept-Encoding is not forwarded),
// so that what passes can be masked, parsed for usage and stored, and the
// client gets it in identity encoding (h loses Content-Encoding and its
// length). A coding the proxy cannot undo is refused: it could hide a key.
func (p *Proxy) identityBody(body *upstreamBody, h *fasthttp.ResponseHeader) (io.Reader, io.Closer, error) {
	if body == nil {
		return nil, nil, nil
	}
	up := body.up
	src := up.BodyStream()
	if src != nil && up.Header.ContentLength() == -1 && body.br != nil {
		src = &coalesced{body: src, br: body.br} // chunked
	}
	enc := strings.TrimSpace(string(up.Header.ContentEncoding()))
	if src == nil || enc == "" || strings.EqualFold(enc, "identity") {
		return src, nil, nil
	}
	decoded, err := scrub.Decode(enc, src, maxDecoded)
	if err != nil {
		return nil, nil, errUnsupportedEncoding
	}
	h.Del(fiber.HeaderContentEncoding)
	h.SetContentLength(-1)
	return decoded, decoded, nil
}

var errUnsupportedEncoding = errors.New("upstream answered in a content coding the proxy cannot decode")

// maskHeaders masks every secret in response header names and values.
// It reports whether it found one.
func (p *Proxy) maskHeaders(h *fasthttp.ResponseHeader) bool {
	var leaked []string
	for k, v := range h.All() {
		if p.out.mask.Contains(k) || p.out.mask.Contains(v) {
			leaked = append(leaked, string(k))
		}
	}
	if len(leaked) == 0 {
		return false
	}
	type field struct{ k, v string }
	var keep []field
	for k, v := range h.All() {
		for _, name := range leaked {
			if string(k) == name {
				keep = append(keep, field{p.out.mask.String(string(k)), p.out.mask.String(string(v))})
			}
		}
	}
	for _, name := range leaked {
		h.Del(name)
	}
	for _, f := range keep {
		h.Add(f.k, f.v)
	}
	return true
}

// upstreamError maps a failure before the response started.
func (p *Proxy) upstreamError(c *fiber.Ctx, err error, ex *exchange) *handlers.APIError {
	switch {
	case ex.bodyLimit != nil && ex.bodyLimit.exceeded:
		lingerAndClose(c)
		ex.status, ex.outcome = handlers.ErrBodyTooLarge.Status, handlers.ErrBodyTooLarge.Outcome
		return handlers.ErrBodyTooLarge
	case ex.bodyLimit != nil && ex.bodyLimit.err != nil:
		// The client's own upload broke (bad chunked framing, or it hung
		// up mid-body): not an upstream failure.
		c.Context().SetConnectionClose()
		ex.status, ex.outcome = handlers.ErrBadBody.Status, handlers.ErrBadBody.Outcome
		return handlers.ErrBadBody
	case errors.Is(err, errUnsupportedEncoding):
		p.out.metrics.upstreamError("unreachable")
		ex.status, ex.outcome = errUpstreamEncoding.Status, errUpstreamEncoding.Outcome
		return errUpstreamEncoding
	case errors.Is(err, errClientCancelled):
		ex.status, ex.outcome = errClientClosedRequest.Status, errClientClosedRequest.Outcome
		return errClientClosedRequest
	case isTimeout(err):
		p.out.metrics.upstreamError("first_byte_timeout")
		ex.status, ex.outcome = errUpstreamTimeout.Status, errUpstreamTimeout.Outcome
		return errUpstreamTimeout
	}
	p.out.metrics.upstreamError("unreachable")
	ex.status, ex.outcome = errUpstreamUnreachable.Status, errUpstreamUnreachable.Outcome
	return errUpstreamUnreachable
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, fasthttp.ErrTimeout) || errors.Is(err, os.ErrDeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}
