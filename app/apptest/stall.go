package apptest

import (
	"fmt"
	"io"
	"net"
	"net/url"
	"testing"
)

// StalledClient sends a keyed POST to proxyURL, reads the first KiB of the
// answer and then stops reading, with a small receive buffer, as a client
// that stalls does. The connection is closed when the test ends; close it
// earlier to end the stall. query, if any, steers the upstream
// ("test_events=40&test_pad_kib=256"); a retry must repeat it.
func StalledClient(t testing.TB, proxyURL, clientKey, idemKey, body, query string) net.Conn {
	t.Helper()
	u, err := url.Parse(proxyURL)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.(*net.TCPConn).SetReadBuffer(4 << 10)
	target := "/v1/chat/completions"
	if query != "" {
		target += "?" + query
	}
	fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"+
		"Idempotency-Key: %s\r\nContent-Length: %d\r\n\r\n%s", target, u.Host, clientKey, idemKey, len(body), body)
	if _, err := io.ReadFull(conn, make([]byte, 1024)); err != nil {
		t.Fatalf("the stalled client's answer did not begin: %v", err)
	}
	return conn
}
