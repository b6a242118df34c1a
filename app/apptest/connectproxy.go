package apptest

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
)

// ConnectProxy is an HTTP CONNECT proxy on loopback, standing in for a
// corporate egress proxy. Routes maps the host:port clients ask for to the
// loopback address that serves it, so tests can name upstreams that no DNS
// knows; anything else is refused with 403.
type ConnectProxy struct {
	URL    string // http://127.0.0.1:port, for HTTPS_PROXY
	Routes map[string]string
	ln     net.Listener
	mu     sync.Mutex
	seen   []string
}

// NewConnectProxy starts the proxy; it is closed when the test ends.
func NewConnectProxy(t testing.TB, routes map[string]string) *ConnectProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &ConnectProxy{URL: "http://" + ln.Addr().String(), Routes: routes, ln: ln}
	go p.serve()
	t.Cleanup(func() { _ = ln.Close() })
	return p
}

// Tunnels lists the CONNECT targets asked for so far.
func (p *ConnectProxy) Tunnels() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.seen...)
}

func (p *ConnectProxy) serve() {
	for {
		conn, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.tunnel(conn)
	}
}

func (p *ConnectProxy) tunnel(conn net.Conn) {
	defer conn.Close()
	br := bufio.NewReader(conn)
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	p.mu.Lock()
	p.seen = append(p.seen, req.Method+" "+req.Host)
	p.mu.Unlock()
	target, ok := p.Routes[req.Host]
	if req.Method != http.MethodConnect || !ok {
		_, _ = io.WriteString(conn, "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
		return
	}
	up, err := net.Dial("tcp", target)
	if err != nil {
		_, _ = io.WriteString(conn, "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
		return
	}
	defer up.Close()
	if _, err := io.WriteString(conn, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		return
	}
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, br); done <- struct{}{} }()
	go func() { _, _ = io.Copy(conn, up); done <- struct{}{} }()
	<-done
}
