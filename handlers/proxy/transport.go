package proxy

import (
	"bufio"
	"errors"
	"io"
	"sync"
	"time"

	"github.com/valyala/fasthttp"
)

// upstreamClients lends each request, for its proxy.Do, a fasthttp.Client
// whose round trip carries that request's hop (deadline, client watch).
// Every lent client sends on the one shared pool of upstream connections,
// so reuse, limits and the dial wrapper are those of a single client.
type upstreamClients struct {
	pool    *fasthttp.HostClient // the upstream connections, shared
	metrics *Metrics
	mu      sync.Mutex
	free    []*upstreamClient // grows to the peak of concurrent requests
}

// upstreamClient is the round trip under proxy.Do, and only that: it sends
// the request on a pooled connection (sendUpstream) and leaves the response
// for the handler, its body still on the connection in an upstreamBody.
// Everything done with the response — headers cleaned and masked, the body
// decoded, masked and teed — happens in Proxy.forward.
type upstreamClient struct {
	fasthttp.Client // its Transport is the client itself
	from            *upstreamClients
	hop             *hop // of the request it is lent to
}

// lend gives a client that sends with h until it is given back.
func (cs *upstreamClients) lend(h *hop) *upstreamClient {
	var c *upstreamClient
	cs.mu.Lock()
	if n := len(cs.free); n > 0 {
		c, cs.free = cs.free[n-1], cs.free[:n-1]
	}
	cs.mu.Unlock()
	if c == nil {
		c = &upstreamClient{from: cs, Client: fasthttp.Client{
			StreamResponseBody:       true,
			NoDefaultUserAgentHeader: true,
			DisablePathNormalizing:   true,
			// The HostClient fasthttp keeps for this client holds no
			// connections; it is dropped after this long unused and remade.
			MaxIdleConnDuration: 10 * time.Second,
		}}
		c.Transport = c
	}
	c.hop = h
	return c
}

// giveBack ends a lend; the body stream, if any, keeps the connection.
func (cs *upstreamClients) giveBack(c *upstreamClient) {
	c.hop = nil
	cs.mu.Lock()
	cs.free = append(cs.free, c)
	cs.mu.Unlock()
}

// RoundTrip sends on the shared pool, not on the HostClient fasthttp made
// for this client.
func (c *upstreamClient) RoundTrip(_ *fasthttp.HostClient, req *fasthttp.Request, resp *fasthttp.Response) (bool, error) {
	if c.hop == nil {
		return false, errors.New("proxy: round trip of a client not lent")
	}
	up := fasthttp.AcquireResponse()
	up.StreamBody = resp.StreamBody
	up.SkipBody = resp.SkipBody
	release, br, err := sendUpstream(c.from.pool, req, up, c.hop, c.from.metrics)
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
	resp.SetBodyStream(&upstreamBody{up: up, release: release, br: br}, up.Header.ContentLength())
	return false, nil
}

// upstreamBody is the upstream response on its connection, between the
// round trip and the handler taking it over. Replacing it as the body
// stream (after take) leaves the connection to its new owner; dropped
// untaken, it closes the connection.
type upstreamBody struct {
	up      *fasthttp.Response
	release func(reuse bool)
	br      *bufio.Reader // what up's body stream reads from
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
