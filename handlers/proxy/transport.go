package proxy

import (
	"errors"
	"io"
	"sync"

	"github.com/valyala/fasthttp"
)

// upstreamTransport is the round trip under proxy.Do, and only that: it
// sends the request on a pooled connection (sendUpstream) and leaves the
// response for the handler, its body still on the connection in an
// upstreamBody. Everything done with the response — headers cleaned and
// masked, the body decoded, masked and teed — happens in Proxy.forward.
type upstreamTransport struct {
	metrics *Metrics
	// hops holds the deadline and client watch of each request in a round
	// trip, lent by forward around proxy.Do (keyed by the request, which
	// proxy.Do passes through unchanged).
	hops sync.Map // *fasthttp.Request → *hop
}

// lend gives the round trip of req its hop until the returned func runs.
func (t *upstreamTransport) lend(req *fasthttp.Request, h *hop) (done func()) {
	t.hops.Store(req, h)
	return func() { t.hops.Delete(req) }
}

func (t *upstreamTransport) RoundTrip(hc *fasthttp.HostClient, req *fasthttp.Request, resp *fasthttp.Response) (bool, error) {
	h, ok := t.hops.Load(req)
	if !ok {
		return false, errors.New("proxy: round trip without a hop")
	}
	up := fasthttp.AcquireResponse()
	up.StreamBody = resp.StreamBody
	up.SkipBody = resp.SkipBody
	release, err := sendUpstream(hc, req, up, h.(*hop), t.metrics)
	if err != nil {
		fasthttp.ReleaseResponse(up)
		return false, err // retries, where safe, happened in sendUpstream
	}
	up.Header.CopyTo(&resp.Header)
	if up.BodyStream() == nil {
		// HEAD, 204 and 304 carry no body stream; the connection is back.
		resp.SetBody(up.Body())
		fasthttp.ReleaseResponse(up)
		return false, nil
	}
	resp.SetBodyStream(&upstreamBody{up: up, release: release}, up.Header.ContentLength())
	return false, nil
}

// upstreamBody is the upstream response on its connection, between the
// round trip and the handler taking it over. Replacing it as the body
// stream (after take) leaves the connection to its new owner; dropped
// untaken, it closes the connection.
type upstreamBody struct {
	up      *fasthttp.Response
	release func(reuse bool)
	taken   bool
}

// takeUpstream takes the upstream response the transport left as resp's
// body; nil if it left none (no body stream).
func takeUpstream(resp *fasthttp.Response) *upstreamBody {
	b, _ := resp.BodyStream().(*upstreamBody)
	if b != nil {
		b.taken = true
	}
	return b
}

var errNotTaken = errors.New("proxy: upstream body read before the handler took it")

func (b *upstreamBody) Read([]byte) (int, error) { return 0, errNotTaken }

// CloseWithError closes the connection unless the body was taken.
func (b *upstreamBody) CloseWithError(error) error {
	if !b.taken {
		b.taken = true
		b.abandon()
	}
	return nil
}

// abandon gives up the connection and the response.
func (b *upstreamBody) abandon() {
	b.release(false)
	fasthttp.ReleaseResponse(b.up)
}

var _ io.Reader = (*upstreamBody)(nil)
