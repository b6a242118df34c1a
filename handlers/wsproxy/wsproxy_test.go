package wsproxy_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	coder "github.com/coder/websocket"
	"github.com/fasthttp/websocket"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// start runs the proxy in front of a fake WebSocket upstream.
func start(t *testing.T, env map[string]string) (*apptest.Instance, *apptest.WSUpstream) {
	t.Helper()
	up := apptest.NewWSUpstream(t)
	in := apptest.Start(t, up.URL+"/v1", env)
	return in, up
}

func wsURL(in *apptest.Instance, pathAndQuery string) string {
	return "ws" + strings.TrimPrefix(in.URL, "http") + pathAndQuery
}

// dial opens a client session the way a server app does (header) or a
// browser does (subprotocols).
func dial(t *testing.T, url string, header http.Header, protocols ...string) (*websocket.Conn, *http.Response, error) {
	t.Helper()
	d := websocket.Dialer{Subprotocols: protocols, HandshakeTimeout: 10 * time.Second}
	c, resp, err := d.Dial(url, header)
	if c != nil {
		t.Cleanup(func() { _ = c.Close() })
	}
	return c, resp, err
}

func bearer(key string) http.Header { return http.Header{"Authorization": {"Bearer " + key}} }

// readEvent reads one text message and its "type".
func readEvent(t *testing.T, c *websocket.Conn) (string, []byte) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	kind, msg, err := c.ReadMessage()
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if kind != websocket.TextMessage {
		t.Fatalf("want a text message, got kind %d", kind)
	}
	var e struct{ Type string }
	_ = json.Unmarshal(msg, &e)
	return e.Type, msg
}

func send(t *testing.T, c *websocket.Conn, msg string) {
	t.Helper()
	if err := c.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
}

// closeOf reads until the session closes and returns the close error.
func closeOf(t *testing.T, c *websocket.Conn) *websocket.CloseError {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(15 * time.Second))
	for {
		_, _, err := c.ReadMessage()
		var ce *websocket.CloseError
		if errors.As(err, &ce) {
			return ce
		}
		if err != nil {
			t.Fatalf("session ended without a close frame: %v", err)
		}
	}
}

// sessionRow waits for the request-log row of the session on path.
func sessionRow(t *testing.T, in *apptest.Instance, path string) models.RequestLog {
	t.Helper()
	var row models.RequestLog
	apptest.Eventually(t, 10*time.Second, func() bool {
		page, err := in.App.Store.ListRequestLogs(context.Background(), models.LogFilter{Path: path})
		if err != nil || len(page.Logs) == 0 {
			return false
		}
		row = page.Logs[0]
		return true
	}, "no request-log row for %s", path)
	return row
}

func ended(t *testing.T, s *apptest.WSSeen) {
	t.Helper()
	select {
	case <-s.Ended:
	case <-time.After(10 * time.Second):
		t.Fatal("upstream session did not end")
	}
}

// TestRealtimeWithHeaderAuth: a server app authenticates with its proxy
// key in Authorization; events, text and binary frames flow both ways; a
// client close code reaches upstream; the session is one log row with the
// usage of response.done.
func TestRealtimeWithHeaderAuth(t *testing.T) {
	in, up := start(t, nil)
	h := bearer(apptest.ClientKey)
	h.Set("OpenAI-Beta", "realtime=v1")
	c, resp, err := dial(t, wsURL(in, "/v1/realtime?model=gpt-realtime"), h, "realtime")
	if err != nil {
		t.Fatalf("dial: %v (%v)", err, resp)
	}
	if got := resp.Header.Get("Sec-WebSocket-Protocol"); got != "realtime" {
		t.Fatalf("subprotocol answered %q, want the upstream's choice realtime", got)
	}
	if typ, _ := readEvent(t, c); typ != "session.created" {
		t.Fatalf("first event %q", typ)
	}
	send(t, c, `{"type":"response.create"}`)
	for _, want := range []string{"response.created", "response.output_text.delta", "response.done"} {
		if typ, msg := readEvent(t, c); typ != want {
			t.Fatalf("event %q, want %q: %s", typ, want, msg)
		}
	}
	send(t, c, `{"type":"conversation.item.create","item":{"type":"message"}}`)
	if _, msg := readEvent(t, c); string(msg) != `{"type":"conversation.item.create","item":{"type":"message"}}` {
		t.Fatalf("text echo %s", msg)
	}
	bin := []byte{0, 1, 2, 255, 254}
	if err := c.WriteMessage(websocket.BinaryMessage, bin); err != nil {
		t.Fatal(err)
	}
	if kind, msg, err := c.ReadMessage(); err != nil || kind != websocket.BinaryMessage || string(msg) != string(bin) {
		t.Fatalf("binary echo: kind %d %v %v", kind, msg, err)
	}
	if err := c.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(4001, "client done"), time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if ce := closeOf(t, c); ce.Code != 4001 {
		t.Fatalf("close echoed with %d", ce.Code)
	}

	s := up.Sessions()[0]
	ended(t, s)
	if code, reason := s.Close(); code != 4001 || reason != "client done" {
		t.Fatalf("upstream saw close %d %q, want 4001 \"client done\"", code, reason)
	}
	if auth := s.Header.Values("Authorization"); len(auth) != 1 || auth[0] != "Bearer "+apptest.UpstreamKey {
		t.Fatalf("upstream Authorization %q, want exactly the server's", auth)
	}
	if s.Header.Get("OpenAI-Beta") != "realtime=v1" || s.Path != "/v1/realtime" || s.Query != "model=gpt-realtime" || s.Protocol != "realtime" {
		t.Fatalf("upstream saw %s?%s beta %q protocol %q", s.Path, s.Query, s.Header.Get("OpenAI-Beta"), s.Protocol)
	}
	if ext := s.Header.Get("Sec-WebSocket-Extensions"); ext != "" {
		t.Fatalf("the proxy offered %q upstream; frames must stay uncompressed", ext)
	}

	row := sessionRow(t, in, "/v1/realtime")
	if row.Status != 101 || row.Outcome != models.OutcomeProxied || row.Client != "alpha" || row.Model != "gpt-realtime" || !row.Stream {
		t.Fatalf("row %+v", row)
	}
	if row.PromptTokens != apptest.RealtimeInputTokens || row.CompletionTokens != apptest.RealtimeOutputTokens ||
		row.TotalTokens != 30 || row.CachedTokens != apptest.RealtimeCachedTokens {
		t.Fatalf("usage %d/%d/%d cached %d", row.PromptTokens, row.CompletionTokens, row.TotalTokens, row.CachedTokens)
	}
	if row.RequestBytes == 0 || row.ResponseBytes == 0 || !strings.Contains(row.Error, "closed 4001 by client") {
		t.Fatalf("bytes %d/%d, close %q", row.RequestBytes, row.ResponseBytes, row.Error)
	}
	metrics := scrape(t, in)
	if !strings.Contains(metrics, `outcome="proxied",route="/v1/realtime",status_class="1xx"} 1`) || !strings.Contains(metrics, "proxy_websocket_sessions 0") {
		t.Fatalf("the session is not counted in /metrics:\n%s", metrics)
	}
}

// TestRealtimeWithSubprotocolAuth: a browser sends its key as the
// openai-insecure-api-key subprotocol; upstream gets the server's key and
// the other subprotocols, never the client's key; an upstream close code
// reaches the client.
func TestRealtimeWithSubprotocolAuth(t *testing.T) {
	in, up := start(t, nil)
	c, resp, err := dial(t, wsURL(in, "/v1/realtime?model=gpt-realtime"), nil,
		"realtime", "openai-insecure-api-key."+apptest.ClientKey2, "openai-beta.realtime-v1")
	if err != nil {
		t.Fatalf("dial: %v (%v)", err, resp)
	}
	if got := resp.Header.Get("Sec-WebSocket-Protocol"); got != "realtime" {
		t.Fatalf("subprotocol answered %q", got)
	}
	for k, v := range resp.Header {
		if strings.Contains(strings.Join(v, ","), apptest.ClientKey2) {
			t.Fatalf("the answer carries the client key in %s", k)
		}
	}
	readEvent(t, c)
	send(t, c, `{"type":"test.close","code":4002,"reason":"upstream done"}`)
	if ce := closeOf(t, c); ce.Code != 4002 || ce.Text != "upstream done" {
		t.Fatalf("client saw close %d %q, want 4002 \"upstream done\"", ce.Code, ce.Text)
	}
	s := up.Sessions()[0]
	if got := s.Header.Values("Sec-Websocket-Protocol"); strings.Join(got, ",") != "realtime, openai-beta.realtime-v1" {
		t.Fatalf("upstream subprotocols %q", got)
	}
	for k, v := range s.Header {
		if strings.Contains(strings.Join(v, ","), apptest.ClientKey2) {
			t.Fatalf("upstream saw the client key in %s", k)
		}
	}
	if auth := s.Header.Values("Authorization"); len(auth) != 1 || auth[0] != "Bearer "+apptest.UpstreamKey {
		t.Fatalf("upstream Authorization %q", auth)
	}
	if row := sessionRow(t, in, "/v1/realtime"); row.Client != "beta" || !strings.Contains(row.Error, "closed 4002 by upstream") {
		t.Fatalf("row %+v", row)
	}
}

// TestRefusedBeforeUpstream: a wrong or missing key, a browser origin not
// in CORS_ALLOWED_ORIGINS, or a malformed handshake is answered in
// OpenAI's JSON shape, and upstream is never contacted.
func TestRefusedBeforeUpstream(t *testing.T) {
	in, up := start(t, map[string]string{"CORS_ALLOWED_ORIGINS": "https://app.example"})
	cases := []struct {
		name      string
		header    http.Header
		protocols []string
		status    int
		code      string
	}{
		{"wrong header key", bearer("pk-wrong-0123456789abc"), nil, 401, "invalid_api_key"},
		{"no key", nil, []string{"realtime"}, 401, "missing_api_key"},
		{"wrong subprotocol key", nil, []string{"realtime", "openai-insecure-api-key.pk-wrong-0123456789"}, 401, "invalid_api_key"},
		{"origin not allowed", http.Header{"Authorization": {"Bearer " + apptest.ClientKey}, "Origin": {"https://evil.example"}}, nil, 403, "origin_not_allowed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, resp, err := dial(t, wsURL(in, "/v1/realtime?model=m"), tc.header, tc.protocols...)
			if err == nil || resp == nil || resp.StatusCode != tc.status {
				t.Fatalf("want %d, got %v %v", tc.status, resp, err)
			}
			body, _ := io.ReadAll(resp.Body)
			if !strings.Contains(string(body), `"code":"`+tc.code+`"`) {
				t.Fatalf("body %s", body)
			}
		})
	}
	if n := up.Handshakes(); n != 0 {
		t.Fatalf("upstream saw %d handshakes for refused upgrades", n)
	}
	// The allowed origin passes.
	h := bearer(apptest.ClientKey)
	h.Set("Origin", "https://app.example")
	if _, resp, err := dial(t, wsURL(in, "/v1/realtime?model=m"), h); err != nil {
		t.Fatalf("allowed origin: %v %v", err, resp)
	}
	if row := sessionRow(t, in, "/v1/realtime"); row.Outcome != models.OutcomeUnauthorized && row.Outcome != models.OutcomeProxied && row.Outcome != models.OutcomeRejected {
		t.Fatalf("row %+v", row)
	}
}

// TestUpstreamRefusesUpgrade: the client gets the upstream's status and
// error body, with the upstream key scrubbed out of it.
func TestUpstreamRefusesUpgrade(t *testing.T) {
	in, _ := start(t, nil)
	_, resp, err := dial(t, wsURL(in, "/v1/realtime?model=m&refuse=401&refuse_echo=1"), bearer(apptest.ClientKey))
	if err == nil || resp == nil || resp.StatusCode != 401 {
		t.Fatalf("want the upstream's 401, got %v %v", resp, err)
	}
	body, _ := io.ReadAll(resp.Body)
	if !strings.Contains(string(body), "test_refused") || strings.Contains(string(body), apptest.UpstreamKey) {
		t.Fatalf("body %s", body)
	}
	if resp.Header.Get("X-Request-Id") != "req_refused" {
		t.Fatalf("x-request-id %q", resp.Header.Get("X-Request-Id"))
	}
}

// TestUpstreamKeyNeverInAFrame: an upstream that echoes its key, even
// split over several frames, reaches the client masked.
func TestUpstreamKeyNeverInAFrame(t *testing.T) {
	in, _ := start(t, nil)
	c, _, err := dial(t, wsURL(in, "/v1/realtime?model=m"), bearer(apptest.ClientKey))
	if err != nil {
		t.Fatal(err)
	}
	readEvent(t, c)
	for _, split := range []int{1, 5, 17, 1000} {
		send(t, c, `{"type":"test.echo_key","split":`+itoa(split)+`}`)
		_, msg := readEvent(t, c)
		want := `{"type":"test.key","authorization":"Bearer ` + strings.Repeat("*", len(apptest.UpstreamKey)) + `"}`
		if string(msg) != want {
			t.Fatalf("split %d: got %s", split, msg)
		}
	}
}

// TestPingPongRelayed: a client ping goes to the upstream, which answers;
// its pong comes back to the client.
func TestPingPongRelayed(t *testing.T) {
	in, _ := start(t, nil)
	c, _, err := dial(t, wsURL(in, "/v1/realtime?model=m"), bearer(apptest.ClientKey))
	if err != nil {
		t.Fatal(err)
	}
	pong := make(chan string, 1)
	c.SetPongHandler(func(data string) error { pong <- data; return nil })
	go func() {
		for {
			if _, _, err := c.ReadMessage(); err != nil {
				return
			}
		}
	}()
	if err := c.WriteControl(websocket.PingMessage, []byte("are-you-there"), time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-pong:
		if got != "are-you-there" {
			t.Fatalf("pong %q", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no pong came back")
	}
}

// TestMessageSizeLimit: a message larger than WS_MAX_MESSAGE_SIZE closes
// the session with 1009, whichever side sent it.
func TestMessageSizeLimit(t *testing.T) {
	in, up := start(t, map[string]string{"WS_MAX_MESSAGE_SIZE": "64KiB"})
	c, _, err := dial(t, wsURL(in, "/v1/realtime?model=m"), bearer(apptest.ClientKey))
	if err != nil {
		t.Fatal(err)
	}
	readEvent(t, c)
	send(t, c, `"`+strings.Repeat("a", 100<<10)+`"`)
	if ce := closeOf(t, c); ce.Code != websocket.CloseMessageTooBig {
		t.Fatalf("client message too big: close %d", ce.Code)
	}
	ended(t, up.Sessions()[0])
	if code, _ := up.Sessions()[0].Close(); code != coder.StatusGoingAway {
		t.Fatalf("upstream got %d, want 1001", code)
	}

	c, _, err = dial(t, wsURL(in, "/v1/realtime?model=m"), bearer(apptest.ClientKey))
	if err != nil {
		t.Fatal(err)
	}
	readEvent(t, c)
	send(t, c, `{"type":"test.big","bytes":`+itoa(100<<10)+`}`)
	if ce := closeOf(t, c); ce.Code != websocket.CloseMessageTooBig || !strings.Contains(ce.Text, "upstream") {
		t.Fatalf("upstream message too big: close %d %q", ce.Code, ce.Text)
	}
}

// TestIdleSessionClosed: a session where nothing moves is closed with
// 1001 on both sides at WS_IDLE_TIMEOUT, and logged.
func TestIdleSessionClosed(t *testing.T) {
	in, up := start(t, map[string]string{"WS_IDLE_TIMEOUT": "300ms"})
	c, _, err := dial(t, wsURL(in, "/v1/realtime?model=m"), bearer(apptest.ClientKey))
	if err != nil {
		t.Fatal(err)
	}
	readEvent(t, c)
	began := time.Now()
	ce := closeOf(t, c)
	if ce.Code != websocket.CloseGoingAway || ce.Text != "idle timeout" {
		t.Fatalf("close %d %q", ce.Code, ce.Text)
	}
	if waited := time.Since(began); waited < 250*time.Millisecond {
		t.Fatalf("closed after %s, before the idle timeout", waited)
	}
	ended(t, up.Sessions()[0])
	if code, _ := up.Sessions()[0].Close(); code != coder.StatusGoingAway {
		t.Fatalf("upstream got %d", code)
	}
	if row := sessionRow(t, in, "/v1/realtime"); !strings.Contains(row.Error, "idle timeout") {
		t.Fatalf("row %+v", row)
	}
}

// TestShutdownClosesSessionsWith1001: open sessions are closed with 1001
// on both sides once SHUTDOWN_GRACE is over.
func TestShutdownClosesSessionsWith1001(t *testing.T) {
	in, up := start(t, map[string]string{"SHUTDOWN_GRACE": "300ms"})
	c, _, err := dial(t, wsURL(in, "/v1/realtime?model=m"), bearer(apptest.ClientKey))
	if err != nil {
		t.Fatal(err)
	}
	readEvent(t, c)
	stopped := make(chan struct{})
	go func() { in.Stop(t); close(stopped) }()
	if ce := closeOf(t, c); ce.Code != websocket.CloseGoingAway || ce.Text != "server shutting down" {
		t.Fatalf("close %d %q", ce.Code, ce.Text)
	}
	ended(t, up.Sessions()[0])
	if code, _ := up.Sessions()[0].Close(); code != coder.StatusGoingAway {
		t.Fatalf("upstream got %d", code)
	}
	select {
	case <-stopped:
	case <-time.After(20 * time.Second):
		t.Fatal("shutdown did not finish")
	}
}

// TestPlainRequestsStillProxied: a GET without an upgrade goes to the HTTP
// proxy as before.
func TestPlainRequestsStillProxied(t *testing.T) {
	in, up := start(t, nil)
	req, _ := http.NewRequest(http.MethodGet, in.URL+"/v1/models", nil)
	req.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || up.PlainRequests() != 1 || up.Handshakes() != 0 {
		t.Fatalf("status %d, plain %d, handshakes %d", resp.StatusCode, up.PlainRequests(), up.Handshakes())
	}
}

func itoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}

// TestClientDropsConnection: a client that vanishes without a close frame
// ends the upstream session with 1001, and the row says so.
func TestClientDropsConnection(t *testing.T) {
	in, up := start(t, nil)
	c, _, err := dial(t, wsURL(in, "/v1/realtime?model=m"), bearer(apptest.ClientKey))
	if err != nil {
		t.Fatal(err)
	}
	readEvent(t, c)
	_ = c.NetConn().Close()
	ended(t, up.Sessions()[0])
	if code, reason := up.Sessions()[0].Close(); code != coder.StatusGoingAway || reason != "client went away" {
		t.Fatalf("upstream got %d %q", code, reason)
	}
	if row := sessionRow(t, in, "/v1/realtime"); row.Outcome != models.OutcomeClientCancelled || !strings.Contains(row.Error, "closed 1006 by client") {
		t.Fatalf("row %+v", row)
	}
	apptest.Eventually(t, 5*time.Second, func() bool { return in.App.WS.Open() == 0 }, "session still open")
}
