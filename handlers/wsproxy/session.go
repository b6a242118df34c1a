package wsproxy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fasthttp/websocket"
	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/handlers/usage"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// session is one proxied WebSocket, from the upgrade request to its log
// row. It outlives the handler (frames flow in the hijacked connection's
// goroutine), so it holds only copied values, never anything from the
// fiber.Ctx.
type session struct {
	p             *Proxy
	start         time.Time
	handshakeDone time.Time
	rec           models.RequestLog
	subprotocols  []string

	upstream *websocket.Conn // set before the session is registered
	last     atomic.Int64    // Unix nanoseconds of the last frame read, either side
	idle     *time.Timer

	up, down direction // client → upstream, upstream → client

	mu      sync.Mutex
	client  *websocket.Conn // set when the client's upgrade completes
	started bool            // run began
	gone    bool            // the client's upgrade never completed
	ended   bool
	closed  bool // the client sent its close frame
	ending  ending
	usage   usage.Usage
	model   string // from the usage event, when the query named none
	limits  limits // the caller's key, its ticket and the session's cost
	once    sync.Once
}

// direction is one half of the relay, with its reusable buffers.
type direction struct {
	name  string // "client" or "upstream": who sends
	bytes atomic.Int64
	ins   inspector
}

func (p *Proxy) newSession(c *fiber.Ctx) *session {
	now := time.Now()
	s := &session{p: p, start: now, rec: models.RequestLog{
		CreatedAt: now.UTC(),
		Method:    fiber.MethodGet,
		Stream:    true,
		ClientIP:  strings.Clone(c.IP()),
		UserAgent: truncate(string(c.Request().Header.UserAgent()), 300),
	}}
	s.up.name, s.down.name = "client", "upstream"
	return s
}

// reject answers an upgrade the proxy refuses before any upstream contact.
func (s *session) reject(c *fiber.Ctx, err error) error {
	e := handlers.AsAPIError(err)
	s.rec.Status, s.rec.Outcome, s.rec.Error = e.Status, e.Outcome, e.Code
	if s.rec.Outcome == "" {
		s.rec.Outcome = models.OutcomeRejected
	}
	s.log()
	return handlers.WriteAPIError(c, e)
}

var (
	errUpstreamUnreachable = &handlers.APIError{Status: http.StatusBadGateway, Type: "server_error", Code: "upstream_unreachable", Outcome: models.OutcomeUpstreamError,
		Message: "The upstream API could not be reached."}
	errUpstreamTimeout = &handlers.APIError{Status: http.StatusGatewayTimeout, Type: "server_error", Code: "upstream_timeout", Outcome: models.OutcomeUpstreamError,
		Message: "The upstream API did not answer the WebSocket upgrade in time."}
)

// upstreamRefused gives the client the upstream's own answer when it
// refused the upgrade (status and error body, the key scrubbed), or a
// 502/504 when it could not be reached.
func (s *session) upstreamRefused(c *fiber.Ctx, resp *http.Response, err error) error {
	if resp == nil || resp.StatusCode < 400 {
		if isTimeout(err) {
			return s.reject(c, errUpstreamTimeout)
		}
		s.p.logger.Debug("websocket upstream unreachable", "path", s.rec.Path, "error", s.p.scrubString(err.Error()))
		return s.reject(c, errUpstreamUnreachable)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20)) // the library kept at most 1 KiB
	s.rec.Status, s.rec.Outcome = resp.StatusCode, models.OutcomeProxied
	s.rec.TTFBMs = time.Since(s.start).Milliseconds()
	s.rec.UpstreamRequestID = truncate(resp.Header.Get("X-Request-Id"), 200)
	s.rec.Error = "upstream refused the upgrade"
	s.log()
	for name, values := range resp.Header {
		if passedDown(name) || name == "Content-Type" {
			for _, v := range values {
				c.Response().Header.Add(name, s.p.scrubString(v))
			}
		}
	}
	return c.Status(resp.StatusCode).Send(s.p.scrub(body))
}

// run relays frames until either side closes, in the goroutine fasthttp
// gives the hijacked client connection.
func (s *session) run(client *websocket.Conn) {
	s.mu.Lock()
	s.client, s.started = client, true
	gone, ended, e := s.gone, s.ended, s.ending
	s.mu.Unlock()
	if gone {
		_ = client.Close()
		return
	}
	defer s.finish()
	if ended { // shut down between the upgrade and now
		s.sendClose(client, e.toClient)
		return
	}
	limit := s.p.cfg.MaxMessageSize
	client.SetReadLimit(limit)
	s.upstream.SetReadLimit(limit)
	s.relayControl(client, s.upstream, &s.up)
	s.relayControl(s.upstream, client, &s.down)
	s.touch()
	s.idle = time.AfterFunc(time.Hour, s.checkIdle)
	s.idle.Reset(s.p.cfg.IdleTimeout)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.pump(s.upstream, client, &s.down)
	}()
	s.pump(client, s.upstream, &s.up)
	<-done
	s.idle.Stop()
}

// abandonIfNotStarted cleans up a session whose client upgrade response
// could not be written: fasthttp then never runs the hijack handler.
func (s *session) abandonIfNotStarted() {
	s.mu.Lock()
	if s.started {
		s.mu.Unlock()
		return
	}
	s.gone = true
	s.ending = ending{code: 1006, by: "client", outcome: models.OutcomeClientCancelled, err: "the client left during the upgrade"}
	s.mu.Unlock()
	s.sendClose(s.upstream, &closeFrame{websocket.CloseGoingAway, "client went away"})
	s.finish()
}

// finish closes both connections and logs the session, once.
func (s *session) finish() {
	s.once.Do(func() {
		s.mu.Lock()
		client, closed := s.client, s.closed
		s.mu.Unlock()
		if client != nil {
			if !closed {
				linger(client.NetConn())
			}
			_ = client.Close()
		}
		_ = s.upstream.Close()
		s.mu.Lock()
		e := s.ending
		s.rec.PromptTokens, s.rec.CompletionTokens, s.rec.TotalTokens = s.usage.PromptTokens, s.usage.CompletionTokens, s.usage.TotalTokens
		s.rec.CachedTokens, s.rec.ReasoningTokens = s.usage.CachedTokens, s.usage.ReasoningTokens
		if s.rec.Model == "" {
			s.rec.Model = s.model
		}
		s.mu.Unlock()
		s.rec.Status = http.StatusSwitchingProtocols
		s.rec.Outcome = e.outcome
		s.rec.Error = truncate(e.describe(), 300)
		s.rec.RequestBytes, s.rec.ResponseBytes = s.up.bytes.Load(), s.down.bytes.Load()
		s.log()
		s.p.unregister(s)
	})
}

func (s *session) log() {
	s.settleLimits()
	if s.rec.TTFBMs == 0 && !s.handshakeDone.IsZero() {
		s.rec.TTFBMs = s.handshakeDone.Sub(s.start).Milliseconds()
	}
	s.rec.DurationMs = time.Since(s.start).Milliseconds()
	if s.p.metrics != nil {
		s.p.metrics.ObserveRequest(s.rec)
	}
	if s.p.sink != nil {
		s.p.sink.Record(s.rec)
	}
}

func (s *session) touch() { s.last.Store(time.Now().UnixNano()) }

// checkIdle ends a session in which no frame moved for WS_IDLE_TIMEOUT.
func (s *session) checkIdle() {
	since := time.Since(time.Unix(0, s.last.Load()))
	if left := s.p.cfg.IdleTimeout - since; left > 0 {
		s.idle.Reset(left)
		return
	}
	s.end(endIdle)
}

// relayControl forwards pings and pongs read from src to dst, instead of
// answering them here, so each end's keep-alive measures the other end;
// and a close from src is passed on to dst and echoed to src.
func (s *session) relayControl(src, dst *websocket.Conn, d *direction) {
	fromUpstream := d == &s.down
	forward := func(kind int) func(string) error {
		return func(data string) error {
			s.touch()
			payload := []byte(data)
			if fromUpstream {
				payload = s.p.scrub(payload)
			}
			_ = dst.WriteControl(kind, payload, time.Now().Add(closeGrace))
			return nil // a dead dst is noticed by its own pump
		}
	}
	src.SetPingHandler(forward(websocket.PingMessage))
	src.SetPongHandler(forward(websocket.PongMessage))
	src.SetCloseHandler(func(code int, text string) error {
		s.touch()
		e := ending{code: code, by: d.name, outcome: models.OutcomeProxied}
		echo := &closeFrame{code, ""}
		if !fromUpstream {
			s.mu.Lock()
			s.closed = true
			s.mu.Unlock()
		}
		if fromUpstream {
			e.toClient, e.toUpstream = &closeFrame{code, s.p.scrubString(text)}, echo
		} else {
			e.toClient, e.toUpstream = echo, &closeFrame{code, text}
		}
		s.end(e)
		return nil
	})
}

// copyBuffers and heldBuffers (the masker's) are taken for one message at
// a time, so an idle session holds neither.
var (
	copyBuffers = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}
	heldBuffers = sync.Pool{New: func() any { b := make([]byte, 0, 16<<10+256); return &b }}
)

// pump relays messages from src to dst until src ends or dst fails. Each
// read is written on at once: a message is never gathered whole.
func (s *session) pump(src, dst *websocket.Conn, d *direction) {
	for {
		kind, r, err := src.NextReader()
		if err != nil {
			s.readFailed(d, err)
			return
		}
		s.touch()
		if !s.relay(kind, r, dst, d) {
			return
		}
	}
}

// relay copies one message; it reports whether the session goes on.
func (s *session) relay(kind int, r io.Reader, dst *websocket.Conn, d *direction) bool {
	// A peer that stops reading holds a write at most this long.
	_ = dst.SetWriteDeadline(time.Now().Add(s.p.cfg.IdleTimeout))
	w, err := dst.NextWriter(kind)
	if err != nil {
		s.writeFailed(d, err)
		return false
	}
	var out io.Writer = w
	var m *masker
	if d == &s.down {
		hp := heldBuffers.Get().(*[]byte)
		defer func() { *hp = m.held[:0]; heldBuffers.Put(hp) }()
		m = &masker{w: w, mask: s.p.mask, hold: s.p.hold, held: (*hp)[:0]}
		out = m
		d.ins.begin(kind == websocket.TextMessage)
	}
	bp := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(bp)
	buf := *bp
	for {
		n, rerr := r.Read(buf)
		if n > 0 {
			s.touch()
			d.bytes.Add(int64(n))
			if d == &s.down {
				d.ins.write(buf[:n])
			}
			if _, err := out.Write(buf[:n]); err != nil {
				s.writeFailed(d, err)
				return false
			}
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			s.readFailed(d, rerr)
			return false
		}
	}
	if m != nil {
		if err := m.flush(); err != nil {
			s.writeFailed(d, err)
			return false
		}
	}
	if err := w.Close(); err != nil {
		s.writeFailed(d, err)
		return false
	}
	if d == &s.down {
		if err := s.observe(&d.ins); err != nil {
			s.cutOverBudget(dst, err)
			return false
		}
	}
	return true
}

// observe adds the usage of a finished upstream event to the session's;
// an error is the key's budget refusing more.
func (s *session) observe(ins *inspector) error {
	u, model, ok := ins.usage()
	if !ok {
		return nil
	}
	s.mu.Lock()
	s.usage.PromptTokens += u.PromptTokens
	s.usage.CompletionTokens += u.CompletionTokens
	s.usage.TotalTokens += u.TotalTokens
	s.usage.CachedTokens += u.CachedTokens
	s.usage.ReasoningTokens += u.ReasoningTokens
	if s.model == "" {
		s.model = truncate(model, 200)
	}
	err := s.charge(u, model)
	s.mu.Unlock()
	return err
}

// readFailed ends the session after src's read ended: a close frame (the
// close handler has already passed it on), an oversized message, or a lost
// connection.
func (s *session) readFailed(d *direction, err error) {
	var ce *websocket.CloseError
	switch {
	case errors.As(err, &ce) && ce.Code != websocket.CloseAbnormalClosure:
		// A close frame: the close handler has passed it on. (The
		// library reports a dropped connection as 1006, which no frame
		// carries.)
	case errors.Is(err, websocket.ErrReadLimit):
		// The library has told the sender 1009 already.
		if d == &s.down {
			s.end(ending{code: websocket.CloseMessageTooBig, by: "upstream", outcome: models.OutcomeUpstreamError, err: "upstream message exceeds WS_MAX_MESSAGE_SIZE",
				toClient: &closeFrame{websocket.CloseMessageTooBig, "upstream message exceeds WS_MAX_MESSAGE_SIZE"}})
		} else {
			s.end(ending{code: websocket.CloseMessageTooBig, by: "client", outcome: models.OutcomeRejected, err: "client message exceeds WS_MAX_MESSAGE_SIZE",
				toUpstream: &closeFrame{websocket.CloseGoingAway, "client went away"}})
		}
	default:
		s.lost(d, err)
	}
}

// writeFailed ends the session after a write to the other side failed.
func (s *session) writeFailed(d *direction, err error) {
	if d == &s.down {
		s.lost(&s.up, err) // the client is gone
	} else {
		s.lost(&s.down, err)
	}
}

// lost ends the session when d's sender vanished without a close frame.
func (s *session) lost(d *direction, err error) {
	if d == &s.up {
		s.end(ending{code: websocket.CloseAbnormalClosure, by: "client", outcome: models.OutcomeClientCancelled, err: "client connection lost",
			toUpstream: &closeFrame{websocket.CloseGoingAway, "client went away"}})
		return
	}
	s.p.logger.Debug("websocket upstream lost", "path", s.rec.Path, "error", s.p.scrubString(err.Error()))
	s.end(ending{code: websocket.CloseAbnormalClosure, by: "upstream", outcome: models.OutcomeUpstreamError, err: "upstream connection lost",
		toClient: &closeFrame{websocket.CloseInternalServerErr, "upstream connection lost"}})
}

// ending is how a session ends: the close code recorded and who sent it,
// and the close frames the proxy sends each side.
type ending struct {
	code                 int
	by                   string // client, upstream or proxy
	outcome, err         string
	toClient, toUpstream *closeFrame // nil: nothing to send
}

type closeFrame struct {
	code int
	text string
}

var (
	endIdle = ending{code: websocket.CloseGoingAway, by: "proxy", outcome: models.OutcomeProxied, err: "idle timeout (WS_IDLE_TIMEOUT)",
		toClient: &closeFrame{websocket.CloseGoingAway, "idle timeout"}, toUpstream: &closeFrame{websocket.CloseGoingAway, "idle timeout"}}
	endShutdown = ending{code: websocket.CloseGoingAway, by: "proxy", outcome: models.OutcomeProxied, err: "proxy shutting down",
		toClient: &closeFrame{websocket.CloseGoingAway, "server shutting down"}, toUpstream: &closeFrame{websocket.CloseGoingAway, "server shutting down"}}
)

// describe is the session's line in the request log's error column: how
// it closed, even when it closed normally.
func (e ending) describe() string {
	s := fmt.Sprintf("websocket closed %d by %s", e.code, e.by)
	if e.err != "" {
		s += ": " + e.err
	}
	return s
}

// end ends the session once: it sends each side its close frame, then
// gives both a bounded time to answer, after which their reads fail and
// the pumps return.
func (s *session) end(e ending) {
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		return
	}
	s.ended, s.ending = true, e
	client := s.client
	s.mu.Unlock()
	if client != nil {
		s.sendClose(client, e.toClient)
		_ = client.NetConn().SetReadDeadline(time.Now().Add(closeGrace))
	}
	s.sendClose(s.upstream, e.toUpstream)
	_ = s.upstream.NetConn().SetReadDeadline(time.Now().Add(closeGrace))
}

func (s *session) sendClose(c *websocket.Conn, f *closeFrame) {
	if f == nil {
		return
	}
	// Control frame payloads are at most 125 bytes: 2 for the code.
	text := strings.ToValidUTF8(truncate(f.text, 123), "")
	_ = c.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(f.code, text), time.Now().Add(time.Second))
}

// linger reads and drops what a client still sends after the proxy closed
// its session (the rest of an oversized message, frames in flight), for a
// moment, until it hangs up: closing a socket with unread input resets the
// connection, and the client would lose the close frame explaining why.
func linger(nc net.Conn) {
	_ = nc.SetReadDeadline(time.Now().Add(time.Second))
	_, _ = io.Copy(io.Discard, io.LimitReader(nc, 64<<20))
}

func isTimeout(err error) bool {
	var ne interface{ Timeout() bool }
	return errors.As(err, &ne) && ne.Timeout()
}
