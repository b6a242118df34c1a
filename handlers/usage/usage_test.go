package usage

import (
	"github.com/tidwall/gjson"

	"strings"
	"testing"
)

const chatStream = "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n" +
	"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7,\"prompt_tokens_details\":{\"cached_tokens\":1},\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\n\n" +
	"data: [DONE]\n\n"

const responsesStream = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\"}}\n\n" +
	"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n" +
	"event: response.completed\r\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":3,\"total_tokens\":12}}}\r\n\r\n"

func TestStream(t *testing.T) {
	for _, tc := range []struct {
		name     string
		in       string
		want     Usage
		terminal bool
		events   int
	}{
		{"chat", chatStream, Usage{5, 2, 7, 1, 1, 0, 0}, true, 3},
		{"responses with CRLF", responsesStream, Usage{9, 3, 12, 0, 0, 0, 0}, true, 3},
		{"cut before the end", chatStream[:strings.Index(chatStream, "data: [DONE]")], Usage{5, 2, 7, 1, 1, 0, 0}, false, 2},
		{"keep-alive comments only", ": ping\n\n: ping\n\n", Usage{}, false, 0},
		{"multi-line data", "data: {\"usage\":\ndata: {\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n", Usage{1, 1, 2, 0, 0, 0, 0}, false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var s Stream
			_, _ = s.Write([]byte(tc.in))
			if s.Usage() != tc.want || s.Terminal() != tc.terminal || s.Events() != tc.events {
				t.Fatalf("usage %+v terminal %v events %d; want %+v %v %d", s.Usage(), s.Terminal(), s.Events(), tc.want, tc.terminal, tc.events)
			}
		})
	}
}

func TestFromJSONAndTail(t *testing.T) {
	body := `{"object":"list","data":[{"embedding":[0.1,0.2]}],"model":"m","usage":{"prompt_tokens":8,"total_tokens":8}}`
	if u, ok := FromJSON([]byte(body)); !ok || u != (Usage{PromptTokens: 8, TotalTokens: 8}) {
		t.Fatalf("FromJSON: %+v %v", u, ok)
	}
	// The tail of a body too large to keep still has the usage.
	if u, ok := FromTail([]byte(body[30:])); !ok || u.TotalTokens != 8 {
		t.Fatalf("FromTail: %+v %v", u, ok)
	}
	// The last "usage" is the body's own; an earlier one is some field's.
	twice := `{"metadata":{"usage":{"total_tokens":99}},"usage":{"prompt_tokens":3,"total_tokens":3}}`
	if u, ok := FromTail([]byte(twice)); !ok || u.TotalTokens != 3 {
		t.Fatalf("FromTail with two usage keys: %+v %v", u, ok)
	}
	// A key that only ends in usage is not "usage".
	suffixed := `{"usage":{"total_tokens":3},"my_usage":{"total_tokens":99},"usage_":{"total_tokens":98}}`
	if u, ok := FromTail([]byte(suffixed)); !ok || u.TotalTokens != 3 {
		t.Fatalf("FromTail with my_usage after usage: %+v %v", u, ok)
	}
	if u, ok := FromTail([]byte(`usage":{"total_tokens":5}}`)); ok {
		t.Fatalf("FromTail of a tail cut inside the key: %+v, want none", u)
	}
	resp := `{"id":"resp_1","output":[],"usage":{"input_tokens":4,"output_tokens":6,"total_tokens":10,"output_tokens_details":{"reasoning_tokens":2}}}`
	if u, ok := FromJSON([]byte(resp)); !ok || u != (Usage{4, 6, 10, 0, 2, 0, 0}) {
		t.Fatalf("responses: %+v", u)
	}
	chat := `{"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18,` +
		`"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":5},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":4}}}`
	if u, _ := FromJSON([]byte(chat)); u != (Usage{11, 7, 18, 3, 0, 5, 4}) {
		t.Fatalf("chat with audio: %+v", u)
	}
	// Realtime: cached audio is in the cached count, not the audio one.
	realtime := `{"input_tokens":30,"output_tokens":20,"total_tokens":50,"input_token_details":{"cached_tokens":12,"text_tokens":10,"audio_tokens":20,` +
		`"cached_tokens_details":{"text_tokens":4,"audio_tokens":8}},"output_token_details":{"text_tokens":5,"audio_tokens":15}}`
	if u, _ := FromObject(gjson.Parse(realtime)); u != (Usage{30, 20, 50, 12, 0, 12, 15}) {
		t.Fatalf("realtime: %+v", u)
	}
	for _, bad := range []string{"", "{", `{"usage":5}`, "not json"} {
		if _, ok := FromJSON([]byte(bad)); ok {
			t.Fatalf("FromJSON(%q) reported usage", bad)
		}
	}
}

// FuzzStreamChunking: however a stream is split into reads, the events,
// usage and end seen are the same as when it arrives whole.
func FuzzStreamChunking(f *testing.F) {
	f.Add([]byte(chatStream), uint8(1))
	f.Add([]byte(responsesStream), uint8(7))
	f.Add([]byte("data: x\r\n\r\ndata: [DONE]\n\n"), uint8(3))
	f.Fuzz(func(t *testing.T, in []byte, step uint8) {
		var whole, pieces Stream
		_, _ = whole.Write(in)
		n := int(step)%64 + 1
		for i := 0; i < len(in); i += n {
			_, _ = pieces.Write(in[i:min(i+n, len(in))])
		}
		if whole.Usage() != pieces.Usage() || whole.Terminal() != pieces.Terminal() || whole.Events() != pieces.Events() {
			t.Fatalf("chunking by %d changed the result: %+v/%v/%d vs %+v/%v/%d", n,
				whole.Usage(), whole.Terminal(), whole.Events(), pieces.Usage(), pieces.Terminal(), pieces.Events())
		}
	})
}

// BenchmarkUsage reads the usage of a small chat completion: whole, as
// the proxy does for a keyed JSON answer, and from its last bytes, as it
// does for an unkeyed one.
func BenchmarkUsage(b *testing.B) {
	body := []byte(`{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"Hello! How can I help you today?","refusal":null}}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":2,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_1"}`)
	for name, read := range map[string]func([]byte) (Usage, bool){"FromJSON": FromJSON, "FromTail": FromTail} {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if u, ok := read(body); !ok || u.TotalTokens != 18 {
					b.Fatal(u)
				}
			}
		})
	}
}
