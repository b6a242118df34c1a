package usage

import (
	"bytes"
	"io"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/tidwall/gjson"
)

func TestAskForStreamUsage(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`{"model":"m","stream":true}`, `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`},
		{"{\n  \"stream\": true,\n  \"messages\": []\n}\n", "{\n  \"stream\": true,\n  \"messages\": []\n,\"stream_options\":{\"include_usage\":true}}\n"},
		{`{"stream":true,"stream_options":null}`, `{"stream":true,"stream_options":{"include_usage":true}}`},
		{`{"stream":true,"stream_options":{}}`, `{"stream":true,"stream_options":{"include_usage":true}}`},
		{`{"stream":true,"stream_options":{"include_obfuscation":false}}`, `{"stream":true,"stream_options":{"include_usage":true,"include_obfuscation":false}}`},
		{`{"stream":true,"stream_options":{"include_usage":false,"x":1}}`, `{"stream":true,"stream_options":{"include_usage":true,"x":1}}`},
		{`{"stream":true,"stream_options":{"include_usage":null}}`, `{"stream":true,"stream_options":{"include_usage":true}}`},
		{`{"stream":true,"stream_options":{"include_usage":true}}`, ""}, // asked already
		{`{"stream":false}`, ""},
		{`{"stream":"true"}`, ""},
		{`{"stream":true,"stream_options":"x"}`, ""},
		{`{"stream":true`, ""}, // not JSON: forwarded as sent
		{`[{"stream":true}]`, ""},
	} {
		got, ok := AskForStreamUsage([]byte(tc.in))
		if string(got) != tc.want || ok != (tc.want != "") {
			t.Errorf("AskForStreamUsage(%q) = %q, %v; want %q", tc.in, got, ok, tc.want)
		}
		if ok && gjson.GetBytes(got, "stream_options.include_usage").Type != gjson.True {
			t.Errorf("%q: include_usage not true in %q", tc.in, got)
		}
	}
}

// asked is a stream as OpenAI sends it when include_usage is set; unasked
// is the same stream without it.
const (
	asked = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n" +
		": keep-alive\n\n" +
		"data: {\"usage\":null,\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\n" +
		"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n" +
		"data: [DONE]\n\n"
	unasked = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n" +
		": keep-alive\n\n" +
		"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\n" +
		"data: [DONE]\n\n"
)

func TestHideStreamUsage(t *testing.T) {
	for name, wrap := range map[string]func(io.Reader) io.Reader{
		"whole": func(r io.Reader) io.Reader { return r },
		"bytes": iotest.OneByteReader,
	} {
		var s Stream
		got, err := io.ReadAll(HideStreamUsage(wrap(strings.NewReader(asked)), &s))
		if err != nil || string(got) != unasked {
			t.Errorf("%s: got %q, %v; want %q", name, got, err, unasked)
		}
		if s.Usage() != (Usage{PromptTokens: 5, CompletionTokens: 2, TotalTokens: 7}) || !s.Terminal() {
			t.Errorf("%s: the parser saw usage %+v terminal %v", name, s.Usage(), s.Terminal())
		}
	}
}

func TestHideStreamUsageLeavesOthersAlone(t *testing.T) {
	for _, in := range []string{
		"data: {\"choices\":[{\"index\":0}],\"usage\":{\"total_tokens\":3}}\n\n", // usage on a content chunk: not ours to remove
		"data: {\"usage\":null}\ndata: {\"x\":1}\n\n",                            // several data lines
		"event: x\ndata: \"usage\"\n\n",
		"data: {\"id\":\"c\",\"choices\":[]", // cut mid-event
		"data: {\"choices\":[],\"usage\":{\"total_tokens\":1}," + strings.Repeat(" ", maxHeld) + "\"x\":1}\n\ndata: [DONE]\n\n", // too large to hold
	} {
		got, err := io.ReadAll(HideStreamUsage(strings.NewReader(in), io.Discard))
		if err != nil || string(got) != in {
			t.Errorf("got %q, %v; want it unchanged: %q", got, err, in)
		}
	}
}

// TestHideStreamUsagePassesEachEventAtOnce: an event is handed on as soon
// as it is complete, without waiting for more of the stream.
func TestHideStreamUsagePassesEachEventAtOnce(t *testing.T) {
	pr, pw := io.Pipe()
	r := HideStreamUsage(pr, io.Discard)
	buf := make([]byte, 4096)
	for _, ev := range []string{"data: {\"a\":1,\"usage\":null}\n\n", "data: {\"b\":2}\n\n"} {
		go func() { _, _ = pw.Write([]byte(ev)) }()
		var got []byte
		for !bytes.HasSuffix(got, []byte("\n\n")) {
			n, err := r.Read(buf)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, buf[:n]...)
		}
		if want := strings.Replace(ev, `,"usage":null`, "", 1); string(got) != want {
			t.Fatalf("got %q, want %q", got, want)
		}
	}
	pw.Close()
}

// benchStream is a 100-delta chat stream as OpenAI sends it with
// include_usage.
func benchStream() []byte {
	var b bytes.Buffer
	for range 100 {
		b.WriteString(`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","choices":[{"index":0,"delta":{"content":"token "},"finish_reason":null}],"usage":null}` + "\n\n")
	}
	b.WriteString(`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4.1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":100,"total_tokens":105}}` + "\n\n")
	b.WriteString("data: [DONE]\n\n")
	return b.Bytes()
}

// eventReader hands out one event per Read, as an upstream's flushes do.
type eventReader struct{ events [][]byte }

func (r *eventReader) Read(p []byte) (int, error) {
	if len(r.events) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.events[0])
	r.events = r.events[1:]
	return n, nil
}

func events(b []byte) [][]byte {
	var out [][]byte
	for len(b) > 0 {
		i := bytes.Index(b, []byte("\n\n")) + 2
		out, b = append(out, b[:i]), b[i:]
	}
	return out
}

// BenchmarkStreamParse is what every stream costs today: the usage parser.
func BenchmarkStreamParse(b *testing.B) {
	evs, buf := events(benchStream()), make([]byte, 32<<10)
	b.ReportAllocs()
	for b.Loop() {
		var s Stream
		r := &eventReader{evs}
		for {
			n, err := r.Read(buf)
			_, _ = s.Write(buf[:n])
			if err != nil {
				break
			}
		}
	}
}

// BenchmarkHideStreamUsage is the same stream through the parser and the
// hider, for a client that did not ask for usage.
func BenchmarkHideStreamUsage(b *testing.B) {
	evs, buf := events(benchStream()), make([]byte, 32<<10)
	b.ReportAllocs()
	for b.Loop() {
		var s Stream
		h := HideStreamUsage(&eventReader{evs}, &s)
		for {
			if _, err := h.Read(buf); err != nil {
				break
			}
		}
	}
}
