package apptest

import (
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Upstream is a fake OpenAI API over real HTTP, speaking JSON and SSE.
// Tests steer it with query parameters, which the proxy forwards as they
// are (request headers are left to tests of header handling):
//
//	test_status=500         answer with this status (an OpenAI error body)
//	test_delay_ms=200       wait before answering
//	test_events=10          number of SSE content events
//	test_interval_ms=100    pause between SSE events
//	test_cut_after=3        drop the connection after this many events
//	test_no_done=1          end the stream without its terminal event
//	test_gzip=1             gzip the JSON body regardless of Accept-Encoding
//	test_block=1            wait until the request is cancelled or Release
//	test_echo_auth=1        answer 401 echoing the Authorization it received
//	test_header_kib=40      add a response header of this many KiB
//	test_pad_kib=64         pad each SSE content event by this many KiB
//	test_echo_all=1         a 200 that echoes the Authorization it received in a
//	                        header, the request id and the body (JSON, or each
//	                        SSE event, written in two halves that split the key)
//	test_audio=1            usage with audio tokens: JSON chat 5 of 11 prompt and
//	                        4 of 7 completion tokens, the stream's usage chunk 2
//	                        of 5 and 6 of its completion tokens
//	test_id=abc             a name for the request, to find it among Requests()
//	test_once=1             steer only the first request with this test_id; later
//	                        ones get the plain answer. A keyed retry must repeat
//	                        its first attempt's query (it is part of the
//	                        request's fingerprint), so this is how a first
//	                        attempt fails and its retry succeeds.
type Upstream struct {
	*httptest.Server
	calls     atomic.Int64 // requests that reached a handler
	cancelled atomic.Int64 // requests whose context ended before they finished
	completed atomic.Int64 // responses written to their end
	mu        sync.Mutex
	requests  []Seen
	release   chan struct{}
	releaseMu sync.Once
	seq       atomic.Int64
	steered   map[string]bool // test_id values whose test_once steering was used
}

// Seen is what the upstream saw of one request.
type Seen struct {
	Method, Path, Query string
	ID                  string // its test_id
	Header              http.Header
	BodySHA             string
	BodyLen             int
	Body                []byte        // the body itself, when at most 64 KiB
	Ended               chan struct{} // closed when the handler returns
	Cancelled           bool
}

// NewUpstream starts a fake upstream; it is closed when the test ends.
func NewUpstream(t testing.TB) *Upstream { return NewUpstreamWith(t, nil) }

// NewUpstreamWith starts a fake upstream after configure has set up its
// server (idle timeouts, connection hooks, a wrapping handler).
func NewUpstreamWith(t testing.TB, configure func(*httptest.Server)) *Upstream {
	u := &Upstream{release: make(chan struct{}), steered: map[string]bool{}}
	u.Server = httptest.NewUnstartedServer(http.HandlerFunc(u.serve))
	if configure != nil {
		configure(u.Server)
	}
	u.Server.Start()
	t.Cleanup(func() { u.Release(); u.Server.CloseClientConnections(); u.Server.Close() })
	return u
}

// Calls counts requests that reached the upstream.
func (u *Upstream) Calls() int64 { return u.calls.Load() }

// Cancelled counts requests whose client (the proxy) went away mid-way.
func (u *Upstream) Cancelled() int64 { return u.cancelled.Load() }

// Completed counts responses written to their end.
func (u *Upstream) Completed() int64 { return u.completed.Load() }

// Release unblocks every test_block request.
func (u *Upstream) Release() { u.releaseMu.Do(func() { close(u.release) }) }

// Requests returns what the upstream has seen so far.
func (u *Upstream) Requests() []Seen {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]Seen(nil), u.requests...)
}

// steering is what a request's query asks of the upstream.
type steering struct {
	status, delayMs, events, intervalMs, cutAfter, headerKib, padKib int
	noDone, gzip, block, echoAuth, echoAll, audio                    bool
}

// steeringOf reads the test_* parameters; a test_once request whose
// test_id was seen before gets none.
func (u *Upstream) steeringOf(q url.Values) steering {
	if q.Get("test_once") != "" {
		u.mu.Lock()
		seen := u.steered[q.Get("test_id")]
		u.steered[q.Get("test_id")] = true
		u.mu.Unlock()
		if seen {
			return steering{}
		}
	}
	n := func(name string) int { v, _ := strconv.Atoi(q.Get(name)); return v }
	on := func(name string) bool { return q.Get(name) != "" }
	return steering{status: n("test_status"), delayMs: n("test_delay_ms"), events: n("test_events"), intervalMs: n("test_interval_ms"),
		cutAfter: n("test_cut_after"), headerKib: n("test_header_kib"), padKib: n("test_pad_kib"),
		noDone: on("test_no_done"), gzip: on("test_gzip"), block: on("test_block"), echoAuth: on("test_echo_auth"), echoAll: on("test_echo_all"),
		audio: on("test_audio")}
}

func (u *Upstream) serve(w http.ResponseWriter, r *http.Request) {
	u.calls.Add(1)
	q := r.URL.Query()
	st := u.steeringOf(q)
	body, _ := io.ReadAll(r.Body)
	sum := sha256.Sum256(body)
	seen := Seen{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, ID: q.Get("test_id"), Header: r.Header.Clone(),
		BodySHA: hex.EncodeToString(sum[:]), BodyLen: len(body), Ended: make(chan struct{})}
	if len(body) <= 64<<10 {
		seen.Body = body
	}
	u.mu.Lock()
	u.requests = append(u.requests, seen)
	idx := len(u.requests) - 1
	u.mu.Unlock()
	defer func() {
		if r.Context().Err() != nil {
			u.cancelled.Add(1)
			u.mu.Lock()
			u.requests[idx].Cancelled = true
			u.mu.Unlock()
		}
		close(seen.Ended)
	}()

	if ms := st.delayMs; ms > 0 {
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-r.Context().Done():
			return
		}
	}
	if n := st.headerKib; n > 0 {
		w.Header().Set("X-Large", strings.Repeat("h", n<<10))
	}
	if st.block {
		select {
		case <-u.release:
		case <-r.Context().Done():
			return
		}
	}
	w.Header().Set("X-Request-Id", fmt.Sprintf("req_%d", u.seq.Add(1)))
	w.Header().Set("Openai-Processing-Ms", "12")
	w.Header().Set("X-Ratelimit-Remaining-Requests", "99")
	w.Header().Set("Set-Cookie", "__cf_bm=upstream-cookie; Path=/")
	if echo := r.Header.Get("Authorization"); st.echoAll {
		// A misbehaving upstream that puts what it received everywhere.
		w.Header().Set("X-Echo-Authorization", echo)
		w.Header().Set("X-Request-Id", "req_"+echo)
		w.Header().Set("Openai-Echo", echo)
		var req struct{ Stream bool }
		_ = json.Unmarshal(body, &req)
		if !req.Stream {
			writeJSON(w, st, 200, map[string]any{"id": "chatcmpl-echo", "object": "chat.completion", "model": "gpt-4o-mini", "echo": echo,
				"choices": []any{map[string]any{"index": 0, "message": map[string]any{"role": "assistant", "content": "you sent " + echo}}}})
		} else {
			w.Header().Set("Content-Type", "text/event-stream")
			var out io.Writer = w
			var zw *gzip.Writer
			if st.gzip {
				w.Header().Set("Content-Encoding", "gzip")
				zw = gzip.NewWriter(w)
				out = zw
			}
			flush := func() {
				if zw != nil {
					_ = zw.Flush()
				}
				w.(http.Flusher).Flush()
			}
			for i := range 3 {
				event := fmt.Sprintf(`data: {"id":"chatcmpl-echo","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%d %s"}}]}`+"\n\n", i, echo)
				half := strings.Index(event, echo) + len(echo)/2
				_, _ = io.WriteString(out, event[:half]) // the key split across two reads
				flush()
				_, _ = io.WriteString(out, event[half:])
				flush()
			}
			_, _ = io.WriteString(out, "data: [DONE]\n\n")
			if zw != nil {
				_ = zw.Close()
			}
		}
		u.completed.Add(1)
		return
	}
	if st.echoAuth {
		// A misbehaving upstream that echoes the credentials it received.
		w.Header().Set("X-Echo-Authorization", r.Header.Get("Authorization"))
		writeJSON(w, st, 401, map[string]any{"error": map[string]any{
			"message": "Incorrect API key provided: " + r.Header.Get("Authorization"), "type": "invalid_request_error", "param": nil, "code": "invalid_api_key"}})
		u.completed.Add(1)
		return
	}
	if status := st.status; status >= 400 {
		writeJSON(w, st, status, map[string]any{"error": map[string]any{
			"message": "forced failure", "type": "server_error", "param": nil, "code": strconv.Itoa(status)}})
		u.completed.Add(1)
		return
	}
	var req struct {
		Model         string `json:"model"`
		Stream        bool   `json:"stream"`
		StreamOptions struct {
			IncludeUsage bool `json:"include_usage"`
		} `json:"stream_options"`
	}
	_ = json.Unmarshal(body, &req)
	switch {
	case r.URL.Path == "/chat/completions" && req.Stream:
		u.streamChat(w, r, st, req.Model, req.StreamOptions.IncludeUsage)
		if r.Context().Err() != nil {
			return
		}
	case r.URL.Path == "/chat/completions":
		writeJSON(w, st, 200, chatCompletion(req.Model, u.seq.Load(), st.audio))
	case r.URL.Path == "/responses" && req.Stream:
		u.streamResponses(w, r, st, req.Model)
		if r.Context().Err() != nil {
			return
		}
	case r.URL.Path == "/embeddings":
		writeJSON(w, st, 200, map[string]any{"object": "list", "model": req.Model,
			"data":  []any{map[string]any{"object": "embedding", "index": 0, "embedding": []float64{0.1, -0.2, 0.3}}},
			"usage": map[string]any{"prompt_tokens": 8, "total_tokens": 8}})
	case r.URL.Path == "/files" && r.Method == http.MethodPost:
		u.uploadFile(w, r, st, body)
	case r.URL.Path == "/models":
		writeJSON(w, st, 200, map[string]any{"object": "list", "data": []any{map[string]any{"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "openai"}}})
	default:
		// Echo: what arrived, for forwarding tests.
		writeJSON(w, st, 200, map[string]any{"method": r.Method, "path": r.URL.Path, "query": r.URL.RawQuery,
			"body_sha256": seen.BodySHA, "body_len": len(body)})
	}
	u.completed.Add(1)
}

func chatCompletion(model string, n int64, audio bool) map[string]any {
	prompt, completion := map[string]any{"cached_tokens": 3}, map[string]any{"reasoning_tokens": 2}
	if audio {
		prompt["audio_tokens"], completion["audio_tokens"] = 5, 4
	}
	return map[string]any{
		"id": fmt.Sprintf("chatcmpl-%d", n), "object": "chat.completion", "created": time.Now().Unix(), "model": model,
		"choices": []any{map[string]any{"index": 0, "finish_reason": "stop",
			"message": map[string]any{"role": "assistant", "content": fmt.Sprintf("Hello! (completion %d)", n), "refusal": nil}}},
		"usage": map[string]any{"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
			"prompt_tokens_details": prompt, "completion_tokens_details": completion},
	}
}

// streamChat answers like OpenAI: with include_usage, every chunk carries
// "usage":null and a usage-only chunk comes before [DONE]; without it,
// neither.
func (u *Upstream) streamChat(w http.ResponseWriter, r *http.Request, st steering, model string, includeUsage bool) {
	events, interval := st.streamShape()
	id := fmt.Sprintf("chatcmpl-%d", u.seq.Load())
	send := func(event string) bool {
		if _, err := io.WriteString(w, event); err != nil {
			return false
		}
		w.(http.Flusher).Flush()
		return true
	}
	w.Header().Set("Content-Type", "text/event-stream; charset=utf-8")
	w.WriteHeader(200)
	w.(http.Flusher).Flush()
	cut := st.cutAfter
	pad := strings.Repeat("p", st.padKib<<10)
	stream := ChatStream(id, model, events, pad, includeUsage)
	if st.audio && includeUsage {
		i := len(stream) - 2 // the usage chunk
		stream[i] = strings.Replace(stream[i], `"usage":{`, `"usage":{"prompt_tokens_details":{"audio_tokens":2},"completion_tokens_details":{"audio_tokens":6},`, 1)
	}
	for i, event := range stream {
		if cut > 0 && i == cut && i < events {
			panic(http.ErrAbortHandler) // drop the connection mid-stream
		}
		if event == ChatStreamDone && st.noDone {
			return
		}
		if !send(event) || (i < events && !pause(r, interval)) {
			return
		}
	}
}

// ChatStreamDone is the terminal event of a chat completion stream.
const ChatStreamDone = "data: [DONE]\n\n"

// ChatStream returns the events the fake upstream streams for a chat
// completion with this id and model: events content chunks (each padded
// with pad), the finish chunk, with includeUsage the usage chunk (prompt
// 5, completion events tokens), and [DONE].
func ChatStream(id, model string, events int, pad string, includeUsage bool) []string {
	usage := ""
	if includeUsage {
		usage = `,"usage":null`
	}
	var out []string
	for i := range events {
		out = append(out, fmt.Sprintf(`data: {"id":%q,"object":"chat.completion.chunk","created":1,"model":%q,"choices":[{"index":0,"delta":{"content":"tok%d %s"},"finish_reason":null}]%s}`+"\n\n", id, model, i, pad, usage))
	}
	out = append(out, fmt.Sprintf(`data: {"id":%q,"object":"chat.completion.chunk","created":1,"model":%q,"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]%s}`+"\n\n", id, model, usage))
	if includeUsage {
		out = append(out, fmt.Sprintf(`data: {"id":%q,"object":"chat.completion.chunk","created":1,"model":%q,"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":%d,"total_tokens":%d}}`+"\n\n", id, model, events, events+5))
	}
	return append(out, ChatStreamDone)
}

func (u *Upstream) streamResponses(w http.ResponseWriter, r *http.Request, st steering, model string) {
	events, interval := st.streamShape()
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(200)
	send := func(typ, data string) bool {
		if _, err := fmt.Fprintf(w, "event: %s\ndata: %s\n\n", typ, data); err != nil {
			return false
		}
		w.(http.Flusher).Flush()
		return true
	}
	send("response.created", fmt.Sprintf(`{"type":"response.created","response":{"id":"resp_1","model":%q,"status":"in_progress"}}`, model))
	for i := 0; i < events; i++ {
		if !send("response.output_text.delta", fmt.Sprintf(`{"type":"response.output_text.delta","delta":"tok%d "}`, i)) || !pause(r, interval) {
			return
		}
	}
	if !st.noDone {
		send("response.completed", fmt.Sprintf(`{"type":"response.completed","response":{"id":"resp_1","model":%q,"status":"completed","usage":{"input_tokens":9,"output_tokens":%d,"total_tokens":%d,"input_tokens_details":{"cached_tokens":4},"output_tokens_details":{"reasoning_tokens":1}}}}`, model, events, events+9))
	}
}

func (u *Upstream) uploadFile(w http.ResponseWriter, r *http.Request, st steering, body []byte) {
	r.Body = io.NopCloser(strings.NewReader(string(body)))
	if err := r.ParseMultipartForm(1 << 20); err != nil {
		writeJSON(w, st, 400, map[string]any{"error": map[string]any{"message": err.Error(), "type": "invalid_request_error"}})
		return
	}
	f, h, err := r.FormFile("file")
	if err != nil {
		writeJSON(w, st, 400, map[string]any{"error": map[string]any{"message": err.Error(), "type": "invalid_request_error"}})
		return
	}
	defer f.Close()
	content, _ := io.ReadAll(f)
	sum := sha256.Sum256(content)
	writeJSON(w, st, 200, map[string]any{"id": "file-" + hex.EncodeToString(sum[:6]), "object": "file", "bytes": len(content),
		"created_at": time.Now().Unix(), "filename": h.Filename, "purpose": r.FormValue("purpose"), "status": "processed"})
}

func (st steering) streamShape() (events int, interval time.Duration) {
	events = 5
	if st.events > 0 {
		events = st.events
	}
	return events, time.Duration(st.intervalMs) * time.Millisecond
}

// pause waits between events; false when the client went away.
func pause(r *http.Request, d time.Duration) bool {
	if d <= 0 {
		return r.Context().Err() == nil
	}
	select {
	case <-time.After(d):
		return true
	case <-r.Context().Done():
		return false
	}
}

func writeJSON(w http.ResponseWriter, st steering, status int, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	if st.gzip {
		w.Header().Set("Content-Encoding", "gzip")
		w.WriteHeader(status)
		zw := gzip.NewWriter(w)
		_, _ = zw.Write(b)
		_ = zw.Close()
		return
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}
