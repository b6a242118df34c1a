package proxy

import (
	"bufio"
	"io"
	"net"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// chunkedResponse starts reading a chunked response whose bytes the test
// writes to the returned connection, in steps.
func chunkedResponse(t *testing.T) (io.Reader, *bufio.Reader, net.Conn) {
	t.Helper()
	client, server := net.Pipe()
	t.Cleanup(func() { client.Close(); server.Close() })
	// A read that would wait for the network fails instead of hanging.
	_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(client)
	resp := fasthttp.AcquireResponse()
	t.Cleanup(func() { fasthttp.ReleaseResponse(resp) })
	resp.StreamBody = true
	done := make(chan error, 1)
	go func() { done <- resp.Read(br) }()
	if _, err := io.WriteString(server, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	return resp.BodyStream(), br, server
}

// write sends bytes from the upstream's side; net.Pipe is synchronous, so
// they are read into br by a reader running alongside.
func write(t *testing.T, br *bufio.Reader, conn net.Conn, s string) {
	t.Helper()
	done := make(chan error, 1)
	go func() { _, err := io.WriteString(conn, s); done <- err }()
	// Pull exactly len(s) bytes into br's buffer without consuming them.
	if _, err := br.Peek(br.Buffered() + len(s)); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestCoalescedReadsOnlyWhatHasArrived(t *testing.T) {
	body, br, up := chunkedResponse(t)
	c := &coalesced{body: body, br: br}
	p := make([]byte, 4096)

	// Three chunks arrived at once, the fourth only in part: one read
	// returns the three, and does not wait for the fourth.
	write(t, br, up, "6\r\nevent1\r\n6\r\nevent2\r\n6;x=y\r\nevent3\r\n6\r\neve")
	n, err := c.Read(p)
	if err != nil || string(p[:n]) != "event1event2event3" {
		t.Fatalf("read %q, %v; want the three chunks that arrived whole", p[:n], err)
	}
	// The rest of the fourth arrives, then the end: the fourth alone, then
	// EOF once the last chunk has come.
	write(t, br, up, "nt4\r\n")
	if n, err = c.Read(p); err != nil || string(p[:n]) != "event4" {
		t.Fatalf("read %q, %v; want event4", p[:n], err)
	}
	write(t, br, up, "6\r\nevent5\r\n0\r\n\r\n")
	n, err = c.Read(p)
	if string(p[:n]) != "event5" || (err != nil && err != io.EOF) {
		t.Fatalf("read %q, %v; want event5", p[:n], err)
	}
	if err == nil {
		if n, err = c.Read(p); n != 0 || err != io.EOF {
			t.Fatalf("after the last chunk: %d bytes, %v", n, err)
		}
	}
}

func TestChunkBuffered(t *testing.T) {
	for in, want := range map[string]bool{
		"":                        false,
		"5\r\nhello":              false,
		"5\r\nhello\r":            false,
		"5\r\nhello\r\n":          true,
		"A\r\n0123456789\r\n":     true,
		"5;name=v\r\nhello\r\n":   true,
		"0\r\n":                   false,
		"0\r\n\r\n":               true,
		"0\r\nTrailer: x\r\n\r\n": false, // trailers: left to fasthttp
		"zz\r\nhello\r\n":         false,
		"\r\nhello\r\n":           false,
		"12345678\r\n":            false,
	} {
		r := bufio.NewReader(stringReader(in))
		_, _ = r.Peek(len(in))
		if got := chunkBuffered(r); got != want {
			t.Errorf("chunkBuffered(%q) = %v, want %v", in, got, want)
		}
	}
}

type stringReader string

func (s stringReader) Read(p []byte) (int, error) {
	if len(s) == 0 {
		return 0, io.EOF
	}
	return copy(p, s), io.EOF
}
