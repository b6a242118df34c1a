package wsproxy

import (
	"bytes"
	"io"
	"sync"

	"github.com/tidwall/gjson"

	"github.com/openai-idempotent-proxy/proxy/handlers/scrub"
	"github.com/openai-idempotent-proxy/proxy/handlers/usage"
)

// Usage events: the Realtime API reports a response's usage in
// response.done, the Responses API's WebSocket mode in response.completed
// (and .incomplete / .failed, which carry it too).
var usageEvents = map[string]bool{
	"response.done": true, "response.completed": true, "response.incomplete": true, "response.failed": true,
}

// sniffSize is how much of a message is looked at to tell a usage event:
// OpenAI sends "type" (after at most an "event_id") first.
const sniffSize = 256

// windowKeep is how much of a usage event's end is kept: the whole event
// when it is smaller, else its tail, where "usage" sits after the bulky
// output (usage.FromTail).
const windowKeep = 64 << 10

var windows = sync.Pool{New: func() any { b := make([]byte, 0, 2*windowKeep); return &b }}

// inspector watches one upstream message go by, to read usage from it. It
// keeps nothing for messages that are not usage events, and a bounded
// window for those that are; it never holds the message back.
type inspector struct {
	text    bool
	sniff   [sniffSize]byte
	ns      int
	decided bool
	window  *[]byte // nil unless a usage event
	n       int64
}

func (in *inspector) begin(text bool) {
	in.release()
	in.text, in.ns, in.decided, in.n = text, 0, false, 0
}

func (in *inspector) release() {
	if in.window != nil {
		*in.window = (*in.window)[:0]
		windows.Put(in.window)
		in.window = nil
	}
}

func (in *inspector) write(p []byte) {
	if !in.text {
		return
	}
	in.n += int64(len(p))
	if !in.decided {
		k := copy(in.sniff[in.ns:], p)
		in.ns += k
		p = p[k:]
		if in.ns < sniffSize {
			return
		}
		in.decide()
	}
	if in.window != nil {
		w := append(*in.window, p...)
		if len(w) > 2*windowKeep {
			w = w[:copy(w, w[len(w)-windowKeep:])]
		}
		*in.window = w
	}
}

// decide starts a window when the message's first bytes name a usage event.
func (in *inspector) decide() {
	in.decided = true
	head := in.sniff[:in.ns]
	for name := range usageEvents {
		if bytes.Contains(head, []byte(`"`+name+`"`)) {
			in.window = windows.Get().(*[]byte)
			*in.window = append(*in.window, head...)
			return
		}
	}
}

// usage reads the finished message's usage, if it is a usage event, and
// the model it names; the window goes back to its pool.
func (in *inspector) usage() (usage.Usage, string, bool) {
	if !in.text {
		return usage.Usage{}, "", false
	}
	if !in.decided {
		in.decide()
	}
	defer in.release()
	if in.window == nil || !usageEvents[gjson.GetBytes(in.sniff[:in.ns], "type").String()] {
		return usage.Usage{}, "", false
	}
	w := *in.window
	var obj gjson.Result
	var model string
	if in.n <= int64(len(w)) { // the whole event
		if !usage.Valid(w) {
			return usage.Usage{}, "", false
		}
		obj = gjson.GetBytes(w, "response.usage")
		model = gjson.GetBytes(w, "response.model").String()
	} else if i := bytes.LastIndex(w, []byte(`"usage"`)); i >= 0 {
		rest := bytes.TrimLeft(w[i+len(`"usage"`):], " \t\r\n")
		if len(rest) > 0 && rest[0] == ':' {
			obj = gjson.ParseBytes(bytes.TrimLeft(rest[1:], " \t\r\n"))
		}
	}
	u, ok := usage.FromObject(obj)
	if !ok {
		return usage.Usage{}, "", false
	}
	if u.CachedTokens == 0 {
		// The Realtime API's spelling (input_token_details, no "s").
		u.CachedTokens = obj.Get("input_token_details.cached_tokens").Int()
	}
	return u, model, true
}

// masker masks every secret in the bytes written through it (scrub's
// same-length mask), holding back only the last hold bytes (the longest
// secret less one), which may begin an occurrence the next write completes.
// An occurrence that starts in the bytes it releases is complete by then,
// so nothing is masked late.
type masker struct {
	w    io.Writer
	mask *scrub.Masker
	hold int
	held []byte
}

func (m *masker) Write(p []byte) (int, error) {
	if m.hold < 0 || len(p) == 0 {
		return m.w.Write(p)
	}
	m.held = append(m.held, p...)
	if masked := m.mask.Bytes(m.held); &masked[0] != &m.held[0] {
		copy(m.held, masked) // same length
	}
	if len(m.held) <= m.hold {
		return len(p), nil
	}
	cut := len(m.held) - m.hold
	if _, err := m.w.Write(m.held[:cut]); err != nil {
		return 0, err
	}
	m.held = m.held[:copy(m.held, m.held[cut:])]
	return len(p), nil
}

// flush writes what is held at the end of a message.
func (m *masker) flush() error {
	if len(m.held) == 0 {
		return nil
	}
	_, err := m.w.Write(m.held)
	m.held = m.held[:0]
	return err
}

// scrub masks every secret in a short, whole payload (close reasons,
// pings, handshake error bodies and headers).
func (p *Proxy) scrub(b []byte) []byte { return p.mask.Bytes(b) }

func (p *Proxy) scrubString(s string) string { return p.mask.String(s) }
