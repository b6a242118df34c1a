package testdb

import (
	"io"
	"net"
	"net/url"
	"sync"
	"testing"
)

// Forwarder is a TCP relay in front of the database that a test can cut,
// to see how the proxy behaves while its database is unreachable.
type Forwarder struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	down   bool
	conns  map[net.Conn]struct{}
}

// ThroughForwarder returns dbURL rewritten to pass through a new Forwarder.
func ThroughForwarder(t testing.TB, dbURL string) (string, *Forwarder) {
	t.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatalf("testdb: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testdb: %v", err)
	}
	f := &Forwarder{ln: ln, target: u.Host, conns: map[net.Conn]struct{}{}}
	go f.serve()
	t.Cleanup(func() { _ = ln.Close(); f.Down() })
	u.Host = ln.Addr().String()
	return u.String(), f
}

func (f *Forwarder) serve() {
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.mu.Lock()
		if f.down {
			f.mu.Unlock()
			_ = c.Close()
			continue
		}
		f.conns[c] = struct{}{}
		f.mu.Unlock()
		go f.relay(c)
	}
}

func (f *Forwarder) relay(c net.Conn) {
	up, err := net.Dial("tcp", f.target)
	if err != nil {
		_ = c.Close()
		return
	}
	f.mu.Lock()
	f.conns[up] = struct{}{}
	f.mu.Unlock()
	go func() { _, _ = io.Copy(up, c); _ = up.Close() }()
	_, _ = io.Copy(c, up)
	_ = c.Close()
}

// Down cuts every open connection and refuses new ones.
func (f *Forwarder) Down() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down = true
	for c := range f.conns {
		_ = c.Close()
	}
	f.conns = map[net.Conn]struct{}{}
}

// Up accepts connections again.
func (f *Forwarder) Up() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down = false
}
