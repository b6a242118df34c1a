package proxy

import (
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// watchClientOf returns the client connection to watch, or nil where its
// socket cannot be peeked at.
func watchClientOf(conn net.Conn) net.Conn {
	if _, ok := conn.(syscall.Conn); !canPeek || !ok {
		return nil
	}
	return conn
}

// watchDelay is how long a call waits for the upstream before it starts
// watching its client. Most quick answers begin sooner and never pay for a
// watch (a goroutine, a peek and two deadline changes); a client that
// leaves a longer call is still noticed, at most this much later.
const watchDelay = 20 * time.Millisecond

// clientWatch is one call's watch on its client: from watchDelay on it
// closes the upstream connection if the client closes its own. It only
// peeks, so the bytes of a pipelined next request stay for the server (and
// end the watch).
//
// Watches are pooled with their timer: most calls are answered before
// watchDelay and cost a timer reset and stop, no allocation. Only a watch
// whose timer was stopped before it fired goes back to the pool; one that
// fired may still have its run to come, so it is left to the collector.
type clientWatch struct {
	timer    *time.Timer
	h        *hop
	client   net.Conn
	upstream net.Conn
	// decided is taken once: by run as the watch begins, or by endWatch
	// before it can, so a watch never begins after endWatch returned.
	decided atomic.Bool
	done    chan struct{} // closed when a watch that began has ended
}

var clientWatches = sync.Pool{New: func() any {
	w := &clientWatch{done: make(chan struct{})}
	w.timer = time.AfterFunc(time.Hour, w.run)
	w.timer.Stop()
	return w
}}

// watchClient starts watching the call's client, if it has one to watch,
// until endWatch.
func (h *hop) watchClient(upstream net.Conn) {
	if h.client == nil {
		return
	}
	if uc := upstreamConnOf(upstream); uc != nil {
		upstream = uc.Conn // close the socket itself, not a TLS layer that would write
	}
	w := clientWatches.Get().(*clientWatch)
	w.h, w.client, w.upstream = h, h.client, upstream
	h.watch = w
	w.timer.Reset(watchDelay)
}

func (w *clientWatch) run() {
	if !w.decided.CompareAndSwap(false, true) {
		return
	}
	defer close(w.done)
	raw, err := w.client.(syscall.Conn).SyscallConn()
	if err == nil && awaitReadable(raw) == socketClosed {
		w.h.cancelled.Store(true)
		_ = w.upstream.Close()
	}
}

// endWatch stops watching the client, once the answer has begun or the
// call failed.
func (h *hop) endWatch() {
	w := h.watch
	if w == nil {
		return
	}
	h.watch = nil
	if w.timer.Stop() {
		w.h, w.client, w.upstream = nil, nil, nil
		clientWatches.Put(w)
		return
	}
	if w.decided.CompareAndSwap(false, true) {
		return // the timer fired, but its run will find the watch decided
	}
	_ = w.client.SetReadDeadline(time.Unix(1, 0)) // wakes the watcher
	<-w.done
	_ = w.client.SetReadDeadline(time.Time{}) // the server sets its own before the next read
}
