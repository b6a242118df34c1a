package proxy

import (
	"net"
	"testing"
	"time"
)

// deadlineConn records the read deadlines set on it.
type deadlineConn struct {
	net.Conn
	set []time.Time
}

func (c *deadlineConn) SetReadDeadline(t time.Time) error { c.set = append(c.set, t); return nil }
func (c *deadlineConn) SetWriteDeadline(time.Time) error  { return nil }
func (c *deadlineConn) Read(b []byte) (int, error)        { return len(b), nil }

// TestReadDeadlineMovesOnlyWhenItMust: a stream's reads keep the idle
// deadline they find while it is at least the idle limit away (and at most
// 1/64 more), the first byte gets its own shorter limit, and the call's
// deadline is never passed.
func TestReadDeadlineMovesOnlyWhenItMust(t *testing.T) {
	raw := &deadlineConn{}
	c := &upstreamConn{Conn: raw, firstByte: time.Second, idle: time.Minute}
	call := time.Now().Add(time.Hour)
	c.begin(call)
	buf := make([]byte, 8)

	start := time.Now()
	_, _ = c.Read(buf) // awaiting the first byte: its own limit
	if len(raw.set) != 1 || raw.set[0].Sub(start) < time.Second || raw.set[0].Sub(start) > time.Second+time.Second/64+time.Second/10 {
		t.Fatalf("first-byte deadline %v after the read began, want 1 s (+1/64)", raw.set[0].Sub(start))
	}
	_, _ = c.Read(buf) // answered: the idle limit, further away
	for range 100 {
		_, _ = c.Read(buf) // the deadline found is still far enough
	}
	if len(raw.set) != 2 {
		t.Fatalf("%d deadlines set for 102 reads, want 2 (first byte, then idle)", len(raw.set))
	}
	if idle := raw.set[1].Sub(start); idle < time.Minute || idle > time.Minute+time.Minute/64+time.Second {
		t.Fatalf("idle deadline %v after the start, want 1 min (+1/64)", idle)
	}

	// A call deadline nearer than the idle limit is the deadline, exactly.
	soon := time.Now().Add(10 * time.Second)
	c.begin(soon)
	c.awaiting = false
	_, _ = c.Read(buf)
	if last := raw.set[len(raw.set)-1]; !last.Equal(soon) {
		t.Fatalf("deadline %v, want the call's %v", last, soon)
	}
}
