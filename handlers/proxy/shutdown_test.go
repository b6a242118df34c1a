package proxy_test

import (
	"bufio"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// TestGracefulShutdownLetsStreamsFinish: on stop, a stream in flight runs
// to its end, and then the proxy is gone.
func TestGracefulShutdownLetsStreamsFinish(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"SHUTDOWN_GRACE": "10s"})
	req := chatRequest(t, px.URL+"/v1/chat/completions?test_events=10&test_interval_ms=100", streamBody, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if _, err := br.ReadString('\n'); err != nil { // the first event is flowing
		t.Fatal(err)
	}
	stopped := make(chan struct{})
	go func() { px.Stop(t); close(stopped) }()
	rest, err := io.ReadAll(br)
	if err != nil || !strings.HasSuffix(string(rest), "data: [DONE]\n\n") {
		t.Fatalf("stream cut by shutdown: %v, tail %q", err, rest[max(0, len(rest)-40):])
	}
	select {
	case <-stopped:
	case <-time.After(15 * time.Second):
		t.Fatal("shutdown did not finish after the stream ended")
	}
	if _, err := http.Get(px.URL + "/healthz"); err == nil {
		t.Fatal("proxy still answering after shutdown")
	}
}
