package apptest

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/coder/websocket"
)

// WSUpstream is a fake OpenAI WebSocket API over real HTTP: the Realtime
// API at /v1/realtime and the Responses API's WebSocket mode at
// /v1/responses (give the proxy URL()+"/v1" as its base). Tests steer it by
// query and by the messages they send:
//
//	?refuse=401          answer the upgrade with this status and an OpenAI error body
//	?refuse_echo=1       ... whose message quotes the Authorization it received
//	{"type":"response.create"}          a response with usage (response.done or response.completed)
//	{"type":"test.echo_key","split":N}  a text message quoting the Authorization it received, written in
//	                                    frames of N bytes (so the key spans frames)
//	{"type":"test.close","code":C,"reason":R}  close the session with C and R
//	{"type":"test.big","bytes":N}       a text message of N bytes
//	anything else        echoed back, text or binary
//
// Plain HTTP requests get a model list.
type WSUpstream struct {
	*httptest.Server
	mu        sync.Mutex
	sessions  []*WSSeen
	handshake atomic.Int64
	plain     atomic.Int64
}

// WSSeen is what the upstream saw of one session.
type WSSeen struct {
	Path, Query string
	Header      http.Header
	Protocol    string // the subprotocol chosen
	mu          sync.Mutex
	closeCode   websocket.StatusCode
	closeReason string
	Ended       chan struct{} // closed when the session is over
}

// Close reports the close code and reason the upstream received (-1 if the
// connection ended without one); valid once Ended is closed.
func (s *WSSeen) Close() (websocket.StatusCode, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closeCode, s.closeReason
}

// Realtime usage in response.done and Responses usage in
// response.completed, as the fake reports them.
const (
	RealtimeInputTokens, RealtimeOutputTokens, RealtimeCachedTokens    = 10, 20, 4
	ResponsesInputTokens, ResponsesOutputTokens, ResponsesCachedTokens = 7, 5, 2
)

// NewWSUpstream starts the fake; it is closed when the test ends.
func NewWSUpstream(t testing.TB) *WSUpstream { return NewWSUpstreamWith(t, nil) }

// NewWSUpstreamWith lets configure set up the server and start it (StartTLS).
func NewWSUpstreamWith(t testing.TB, configure func(*httptest.Server)) *WSUpstream {
	u := &WSUpstream{}
	u.Server = httptest.NewUnstartedServer(http.HandlerFunc(u.serve))
	if configure != nil {
		configure(u.Server)
	} else {
		u.Server.Start()
	}
	t.Cleanup(func() { u.Server.CloseClientConnections(); u.Server.Close() })
	return u
}

// Handshakes counts upgrade requests that reached the upstream.
func (u *WSUpstream) Handshakes() int64 { return u.handshake.Load() }

// PlainRequests counts plain HTTP requests (answered with a model list).
func (u *WSUpstream) PlainRequests() int64 { return u.plain.Load() }

// Sessions returns the sessions seen so far.
func (u *WSUpstream) Sessions() []*WSSeen {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]*WSSeen(nil), u.sessions...)
}

func (u *WSUpstream) serve(w http.ResponseWriter, r *http.Request) {
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		// Plain HTTP (the same host serves both, as OpenAI's does).
		u.plain.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"object":"list","data":[{"id":"gpt-test","object":"model"}]}`))
		return
	}
	u.handshake.Add(1)
	seen := &WSSeen{Path: r.URL.Path, Query: r.URL.RawQuery, Header: r.Header.Clone(), closeCode: -1, Ended: make(chan struct{})}
	defer close(seen.Ended)
	u.mu.Lock()
	u.sessions = append(u.sessions, seen)
	u.mu.Unlock()
	if status := r.URL.Query().Get("refuse"); status != "" {
		msg := "refused by the test upstream"
		if r.URL.Query().Get("refuse_echo") != "" {
			msg = "you sent " + r.Header.Get("Authorization")
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Request-Id", "req_refused")
		w.WriteHeader(atoi(status))
		_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]any{"message": msg, "type": "invalid_request_error", "code": "test_refused"}})
		return
	}
	conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{"realtime"}})
	if err != nil {
		return
	}
	seen.Protocol = conn.Subprotocol()
	conn.SetReadLimit(-1)
	ctx := context.Background()
	realtime := strings.HasSuffix(r.URL.Path, "/realtime")
	if realtime {
		_ = conn.Write(ctx, websocket.MessageText, []byte(`{"type":"session.created","event_id":"event_1","session":{"id":"sess_1","model":"`+r.URL.Query().Get("model")+`"}}`))
	}
	for {
		kind, msg, err := conn.Read(ctx)
		if err != nil {
			seen.mu.Lock()
			var ce websocket.CloseError
			if errors.As(err, &ce) {
				seen.closeCode, seen.closeReason = ce.Code, ce.Reason
			}
			seen.mu.Unlock()
			return
		}
		if kind == websocket.MessageBinary {
			_ = conn.Write(ctx, websocket.MessageBinary, msg)
			continue
		}
		var cmd struct {
			Type   string `json:"type"`
			Split  int    `json:"split"`
			Code   int    `json:"code"`
			Reason string `json:"reason"`
			Bytes  int    `json:"bytes"`
		}
		_ = json.Unmarshal(msg, &cmd)
		switch cmd.Type {
		case "response.create":
			u.respond(ctx, conn, realtime)
		case "test.echo_key":
			wr, err := conn.Writer(ctx, websocket.MessageText)
			if err != nil {
				return
			}
			text := []byte(`{"type":"test.key","authorization":"` + r.Header.Get("Authorization") + `"}`)
			for len(text) > 0 {
				n := min(max(cmd.Split, 1), len(text))
				_, _ = wr.Write(text[:n]) // one frame per Write
				text = text[n:]
			}
			_ = wr.Close()
		case "test.close":
			_ = conn.Close(websocket.StatusCode(cmd.Code), cmd.Reason)
			seen.mu.Lock()
			seen.closeCode, seen.closeReason = websocket.StatusCode(cmd.Code), "(closed by upstream)"
			seen.mu.Unlock()
			return
		case "test.big":
			_ = conn.Write(ctx, websocket.MessageText, []byte(`"`+strings.Repeat("x", max(cmd.Bytes-2, 0))+`"`))
		default:
			_ = conn.Write(ctx, websocket.MessageText, msg)
		}
	}
}

// respond plays one response: created, a delta, and the usage event.
func (u *WSUpstream) respond(ctx context.Context, conn *websocket.Conn, realtime bool) {
	events := []string{
		`{"type":"response.created","event_id":"event_2","response":{"id":"resp_1","object":"realtime.response","status":"in_progress"}}`,
		`{"type":"response.output_text.delta","event_id":"event_3","response_id":"resp_1","delta":"Hello"}`,
		`{"type":"response.done","event_id":"event_4","response":{"id":"resp_1","object":"realtime.response","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"Hello"}]}],` +
			`"usage":{"total_tokens":30,"input_tokens":10,"output_tokens":20,"input_token_details":{"cached_tokens":4,"text_tokens":10,"audio_tokens":0,"cached_tokens_details":{"text_tokens":4,"audio_tokens":0}},"output_token_details":{"text_tokens":20,"audio_tokens":0}}}}`,
	}
	if !realtime {
		events = []string{
			`{"type":"response.created","sequence_number":0,"response":{"id":"resp_2","object":"response","status":"in_progress","model":"gpt-test-ws","output":[]}}`,
			`{"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi"}`,
			`{"type":"response.completed","sequence_number":2,"response":{"id":"resp_2","object":"response","status":"completed","model":"gpt-test-ws","output":[],` +
				`"usage":{"input_tokens":7,"input_tokens_details":{"cached_tokens":2},"output_tokens":5,"output_tokens_details":{"reasoning_tokens":1},"total_tokens":12}}}`,
		}
	}
	for _, e := range events {
		if conn.Write(ctx, websocket.MessageText, []byte(e)) != nil {
			return
		}
	}
}

func atoi(s string) int {
	n := 0
	for _, c := range s {
		if c < '0' || c > '9' {
			return 500
		}
		n = n*10 + int(c-'0')
	}
	return n
}
