package proxy

import (
	"bufio"
	"crypto/tls"
	"errors"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/valyala/fasthttp"
)

// sendUpstream does what fasthttp.DefaultTransport does — write the request
// on a pooled connection, read the response header, leave the body on the
// connection — and adds what a proxy in front of self-hosted servers needs:
//
//   - A pooled connection the upstream has closed while it was idle (Node
//     and uvicorn close idle keep-alive connections after 5 s) is found
//     before the request is written, by a non-blocking peek at the socket
//     and by honouring the upstream's Keep-Alive: timeout=N, and a fresh one
//     is used. A request is sent again only when the failure proves the
//     upstream never read it: the write failed, or the peer reset a reused
//     connection before any response byte (a clean EOF could follow a
//     request the upstream processed, so it is retried only for GET and HEAD).
//   - UPSTREAM_TIMEOUT bounds the whole call from the first byte written
//     (the hop's deadline on the connection), not only the body.
//   - Response header blocks larger than the read buffer are read with a
//     larger one instead of failing.
//
// On success it returns release, which gives the connection back to the
// pool (reuse) or closes it; the caller must call it exactly once after the
// body stream is done. A response without a body stream has been released.
// br is the buffered reader the body stream reads from.
func sendUpstream(hc *fasthttp.HostClient, req *fasthttp.Request, resp *fasthttp.Response, h *hop, m *Metrics) (release func(reuse bool), br *bufio.Reader, err error) {
	if req.Header.IsHead() {
		resp.SkipBody = true
	}
	// Writing a body stream consumes and closes it (IsBodyStream is false
	// after the write), so ask before: a streamed body is never sent again.
	streamed := req.IsBodyStream()
	resent := 0
	for attempt := 0; attempt < maxConnAttempts; attempt++ {
		cc, err := hc.AcquireConn(0, req.ConnectionClose())
		if err != nil {
			return nil, nil, err
		}
		conn := cc.Conn()
		uc := upstreamConnOf(conn)
		reused := !cc.LastUseTime().IsZero()
		if reused && uc != nil && !uc.reusable(time.Since(cc.LastUseTime())) {
			hc.CloseConn(cc)
			m.upstreamConn("stale")
			continue
		}
		if uc != nil {
			uc.begin(h.deadline)
		}
		bw := hc.AcquireWriter(conn)
		err = req.Write(bw)
		if err == nil {
			err = bw.Flush()
		}
		hc.ReleaseWriter(bw)
		if err != nil {
			hc.CloseConn(cc)
			if reused && resent < maxResends && !streamed && !isTimeout(err) {
				resent++
				m.upstreamConn("resent")
				continue // the upstream cannot have read the whole request
			}
			return nil, nil, err
		}
		h.watchClient(conn)
		pooled := hc.AcquireReader(conn)
		body := pooled
		err = resp.ReadLimitBody(body, 0)
		if _, small := errors.AsType[*fasthttp.ErrSmallBuffer](err); small {
			// The header block outgrew the pooled buffer; its bytes are
			// still buffered (fasthttp peeks), so read it with a larger one.
			body = bufio.NewReaderSize(pooled, maxUpstreamHeader)
			err = resp.ReadLimitBody(body, 0)
		}
		if err != nil {
			h.endWatch()
			hc.ReleaseReader(pooled)
			hc.CloseConn(cc)
			if h.cancelled.Load() {
				return nil, nil, errClientCancelled
			}
			if reused && uc != nil && resent < maxResends && !streamed && uc.neverAnswered(req) {
				resent++
				m.upstreamConn("resent")
				continue
			}
			return nil, nil, err
		}
		h.upstream = uc
		if uc != nil {
			uc.keepAlive = keepAliveTimeout(resp.Header.Peek("Keep-Alive"))
		}
		closeConn := req.ConnectionClose() || resp.ConnectionClose()
		release = func(reuse bool) {
			hc.ReleaseReader(pooled)
			if reuse && !closeConn {
				hc.ReleaseConn(cc)
			} else {
				hc.CloseConn(cc)
			}
		}
		if resp.BodyStream() == nil {
			h.endWatch()
			release(true)
			return nil, nil, nil
		}
		return release, body, nil
	}
	return nil, nil, errNoUsableConn
}

// hop is what one request's round trip needs of it: its UPSTREAM_TIMEOUT
// deadline, and the client connection to watch. Unkeyed requests watch
// their client while the upstream has not begun to answer (nothing is
// written then, so nothing else would notice it leave) and cancel the call
// if it goes (watch.go).
type hop struct {
	deadline  time.Time
	client    net.Conn      // nil: not watched
	watch     *clientWatch  // until the first body byte: see tee.Read
	upstream  *upstreamConn // the connection the answer comes on, once it has begun
	cancelled atomic.Bool   // the client left before the upstream answered
}

const (
	// maxConnAttempts bounds the pooled connections tried for one request
	// (each stale one is closed, so the pool drains of them quickly).
	maxConnAttempts = 64
	// maxResends bounds how often a request the upstream provably never
	// read is written again on a fresh connection.
	maxResends = 2
	// maxUpstreamHeader is the largest response header block accepted.
	maxUpstreamHeader = 256 << 10
)

var (
	errNoUsableConn    = errors.New("no usable upstream connection")
	errClientCancelled = errors.New("the client went away before the upstream answered")
)

// upstreamConn wraps every connection to the upstream. It is used by one
// request at a time (fasthttp's pool hands it over under a lock), so its
// fields need no synchronisation; only Close may come from another
// goroutine (a client that leaves cancels the call).
type upstreamConn struct {
	net.Conn
	raw             syscall.RawConn  // for peeking; nil where the conn has none
	peek            func(fd uintptr) // sets peeked; built once, so a peek allocates nothing
	peeked          socketState
	firstByte, idle time.Duration

	deadline  time.Time     // the current call's UPSTREAM_TIMEOUT deadline
	readDL    time.Time     // the read deadline last set on the connection
	awaiting  bool          // written, and no response byte read yet
	answered  bool          // a response byte arrived for the current request
	readErr   error         // the last read error of the current request
	keepAlive time.Duration // the upstream's Keep-Alive: timeout, 0 if none
}

func dialUpstream(dial func(addr string) (net.Conn, error), addr string, firstByte, idle time.Duration) (net.Conn, error) {
	conn, err := dial(addr) // directly or through the egress proxy (egress.go)
	if err != nil {
		return nil, err
	}
	uc := &upstreamConn{Conn: conn, firstByte: firstByte, idle: idle}
	if sc, ok := conn.(syscall.Conn); ok && canPeek {
		uc.raw, _ = sc.SyscallConn()
		uc.peek = func(fd uintptr) { uc.peeked = peekFD(fd) }
	}
	return uc, nil
}

// upstreamConnOf finds our wrapper under fasthttp's TLS layer.
func upstreamConnOf(c net.Conn) *upstreamConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	uc, _ := c.(*upstreamConn)
	return uc
}

// begin starts a request on the connection: every write and read of it
// ends by the deadline.
func (c *upstreamConn) begin(deadline time.Time) {
	c.deadline, c.awaiting, c.answered, c.readErr = deadline, true, false, nil
	_ = c.Conn.SetWriteDeadline(deadline)
}

// Read waits at least the first-byte limit for an answer to begin and the
// idle limit between reads after that (at most 1/64 more: a deadline still
// that close is kept rather than moved on every read of a stream), and
// never past the call's deadline. Unlike fasthttp's ReadTimeout, this never
// cuts a long stream that keeps producing.
func (c *upstreamConn) Read(b []byte) (int, error) {
	d := c.idle
	if c.awaiting {
		d = c.firstByte
	}
	earliest := time.Now().Add(d)
	latest := earliest.Add(d / 64)
	if !c.deadline.IsZero() && c.deadline.Before(latest) {
		latest = c.deadline
		if latest.Before(earliest) {
			earliest = latest
		}
	}
	if c.readDL.Before(earliest) || c.readDL.After(latest) {
		if err := c.Conn.SetReadDeadline(latest); err != nil {
			return 0, err
		}
		c.readDL = latest
	}
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.awaiting, c.answered = false, true
	}
	if err != nil {
		c.readErr = err
	}
	return n, err
}

// reusable reports whether an idle pooled connection can carry a request:
// not past the upstream's advertised keep-alive timeout (less a margin for
// the request's travel), and not closed by the peer (a peek finds EOF, a
// reset, or bytes nobody asked for, such as a TLS close_notify).
func (c *upstreamConn) reusable(idleFor time.Duration) bool {
	if c.keepAlive > 0 && idleFor >= c.keepAlive-keepAliveMargin(c.keepAlive) {
		return false
	}
	if c.raw == nil {
		return true
	}
	// A non-blocking look now, consuming nothing.
	if err := c.raw.Control(c.peek); err != nil {
		return false
	}
	return c.peeked == socketIdle
}

func keepAliveMargin(timeout time.Duration) time.Duration {
	return min(time.Second, timeout/2)
}

// neverAnswered reports whether a failed read proves the upstream never
// processed the request, so it may be sent again: no response byte came,
// and either the peer reset the connection (its kernel discarded what we
// sent) or the request is safe to repeat anyway (GET, HEAD).
func (c *upstreamConn) neverAnswered(req *fasthttp.Request) bool {
	if c.answered || isTimeout(c.readErr) {
		return false
	}
	if errors.Is(c.readErr, syscall.ECONNRESET) {
		return true
	}
	return req.Header.IsGet() || req.Header.IsHead()
}

// extendDeadline gives a call whose client is gone at least d more to
// read what the upstream sends (often already in the socket's buffer).
func (c *upstreamConn) extendDeadline(d time.Duration) {
	if c != nil && time.Until(c.deadline) < d {
		c.deadline = time.Now().Add(d)
	}
}

// keepAliveTimeout parses "Keep-Alive: timeout=5, max=100".
func keepAliveTimeout(v []byte) time.Duration {
	if len(v) == 0 {
		return 0 // most answers: no allocation
	}
	for _, part := range strings.Split(string(v), ",") {
		name, value, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok || !strings.EqualFold(name, "timeout") {
			continue
		}
		if n, err := strconv.Atoi(strings.TrimSpace(value)); err == nil && n > 0 {
			return time.Duration(n) * time.Second
		}
	}
	return 0
}
