package usage

import (
	"bytes"
	"io"
	"slices"

	"github.com/tidwall/gjson"
)

// AskForStreamUsage returns a copy of a streamed chat/completions request
// body that asks upstream for the stream's usage
// (stream_options.include_usage = true), every other byte as it was; ok is
// false when the body already asks for it, is not a streamed request, or
// cannot be edited safely (then it is forwarded as it is).
func AskForStreamUsage(body []byte) (out []byte, ok bool) {
	if !Valid(body) {
		return nil, false
	}
	top := gjson.ParseBytes(body)
	if !top.IsObject() || top.Get("stream").Type != gjson.True {
		return nil, false
	}
	const ask = `"include_usage":true`
	opts := top.Get("stream_options")
	switch {
	case !opts.Exists():
		end := bytes.LastIndexByte(body, '}') // the top-level object's end
		return splice(body, end, end, `,"stream_options":{`+ask+`}`), true
	case opts.Type == gjson.Null:
		if !at(body, opts) {
			return nil, false
		}
		return splice(body, opts.Index, opts.Index+len(opts.Raw), `{`+ask+`}`), true
	case !opts.IsObject() || !at(body, opts):
		return nil, false // not an object: upstream refuses it anyway
	}
	inc := opts.Get("include_usage")
	switch {
	case inc.Type == gjson.True:
		return nil, false // the client asked
	case inc.Exists():
		if !at(body, inc) { // Result.Get keeps indexes into body
			return nil, false
		}
		return splice(body, inc.Index, inc.Index+len(inc.Raw), `true`), true
	}
	open := opts.Index + 1 // just inside stream_options' brace
	if len(bytes.TrimSpace([]byte(opts.Raw[1:len(opts.Raw)-1]))) == 0 {
		return splice(body, open, open, ask), true
	}
	return splice(body, open, open, ask+`,`), true
}

// at reports whether r's Index points at its raw text inside json (gjson
// leaves it 0 when it cannot tell).
func at(json []byte, r gjson.Result) bool {
	return r.Index > 0 && r.Index+len(r.Raw) <= len(json) && string(json[r.Index:r.Index+len(r.Raw)]) == r.Raw
}

// splice returns a new slice: b with b[from:to] replaced by s.
func splice(b []byte, from, to int, s string) []byte {
	return slices.Concat(b[:from], []byte(s), b[to:])
}

// maxHeld bounds the bytes of one event held while it is judged; a larger
// event cannot be the usage chunk and passes on as it comes.
const maxHeld = 64 << 10

// HideStreamUsage reads a chat/completions stream for which
// AskForStreamUsage asked for usage, and gives back what the client would
// have received without asking: the usage-only chunk ("choices":[] with a
// "usage" object, sent before [DONE]) is dropped and the "usage":null
// member OpenAI then adds to every other chunk is removed. Every other byte
// passes unchanged, each event as soon as it is complete. seen is shown
// every upstream byte first, usage included.
func HideStreamUsage(src io.Reader, seen io.Writer) io.Reader {
	return &hider{src: src, seen: seen}
}

type hider struct {
	src     io.Reader
	seen    io.Writer
	event   []byte // the event being assembled
	out     []byte // judged bytes; out[off:] the reader has not taken yet
	off     int
	lines   eventLines
	passing bool // the current event outgrew maxHeld: passed on unjudged
	err     error
}

func (h *hider) Read(p []byte) (int, error) {
	for h.off == len(h.out) {
		h.out, h.off = h.out[:0], 0
		if h.err != nil {
			if len(h.event) == 0 {
				return 0, h.err
			}
			// An unfinished last event passes on as it was.
			h.out, h.event = append(h.out, h.event...), h.event[:0]
			break
		}
		if len(p) == 0 {
			return 0, nil
		}
		// Read into p itself: what passes is copied back into it below.
		n, err := h.src.Read(p)
		if n > 0 {
			_, _ = h.seen.Write(p[:n])
			h.split(p[:n])
		}
		h.err = err
	}
	n := copy(p, h.out[h.off:])
	h.off += n
	return n, nil
}

// split assembles events line by line (an event ends at a blank line) and
// judges each one when it ends.
func (h *hider) split(b []byte) {
	for len(b) > 0 {
		line, eventEnd := h.lines.cut(b)
		h.hold(b[:line])
		b = b[line:]
		if eventEnd {
			if !h.passing {
				h.out = appendWithoutUsage(h.out, h.event)
			}
			h.event, h.passing = h.event[:0], false
		}
	}
}

func (h *hider) hold(b []byte) {
	if h.passing {
		h.out = append(h.out, b...)
		return
	}
	h.event = append(h.event, b...)
	if len(h.event) > maxHeld {
		h.out, h.event, h.passing = append(h.out, h.event...), h.event[:0], true
	}
}

// appendWithoutUsage appends one whole event as the client would have had
// it without asking for usage: nothing for the usage-only chunk, the chunk
// without its "usage":null member, or the event unchanged.
func appendWithoutUsage(dst, event []byte) []byte {
	if !bytes.Contains(event, []byte(`"usage"`)) {
		return append(dst, event...) // not ours: a content delta without usage, a comment
	}
	// OpenAI's chunks are one data line; anything else passes unchanged.
	start := bytes.Index(event, []byte("data:"))
	if start < 0 || (start > 0 && event[start-1] != '\n') || bytes.Contains(event[start+5:], []byte("\ndata:")) {
		return append(dst, event...)
	}
	start += 5
	if start < len(event) && event[start] == ' ' {
		start++
	}
	end := start + bytes.IndexByte(event[start:], '\n')
	if end > start && event[end-1] == '\r' {
		end--
	}
	data := event[start:end]
	// OpenAI puts "usage":null last: in JSON, that suffix can only be the
	// top-level object's last member (its quote follows a comma, so it
	// opens a key). Every delta takes this path, without parsing.
	if null := []byte(`,"usage":null}`); bytes.HasSuffix(data, null) {
		dst = append(dst, event[:end-len(null)]...)
		return append(dst, event[end-1:]...)
	}
	obj := gjson.ParseBytes(data)
	if !obj.IsObject() {
		return append(dst, event...)
	}
	u := obj.Get("usage")
	if choices := obj.Get("choices"); u.IsObject() && choices.IsArray() && len(choices.Array()) == 0 {
		return dst // the usage-only chunk
	}
	if u.Type != gjson.Null || !u.Exists() || !at(data, u) {
		return append(dst, event...)
	}
	from, to, ok := memberSpan(data, u)
	if !ok {
		return append(dst, event...)
	}
	dst = append(dst, event[:start+from]...)
	return append(dst, event[start+to:]...)
}

// memberSpan finds the bytes to delete for the member whose value is v:
// from the comma before its key to the end of its value, or, for the first
// member, from its key to the comma after it.
func memberSpan(obj []byte, v gjson.Result) (from, to int, ok bool) {
	i := skipSpaceBack(obj, v.Index-1)
	if i < 0 || obj[i] != ':' {
		return 0, 0, false
	}
	i = skipSpaceBack(obj, i-1)
	key := []byte(`"usage"`)
	if i+1 < len(key) || !bytes.Equal(obj[i+1-len(key):i+1], key) {
		return 0, 0, false
	}
	keyStart := i + 1 - len(key)
	valueEnd := v.Index + len(v.Raw)
	j := skipSpaceBack(obj, keyStart-1)
	switch {
	case j >= 0 && obj[j] == ',':
		return j, valueEnd, true
	case j >= 0 && obj[j] == '{':
		k := valueEnd
		for k < len(obj) && isSpace(obj[k]) {
			k++
		}
		if k < len(obj) && obj[k] == ',' {
			return keyStart, k + 1, true
		}
		return keyStart, valueEnd, true // the only member
	}
	return 0, 0, false
}

func skipSpaceBack(b []byte, i int) int {
	for i >= 0 && isSpace(b[i]) {
		i--
	}
	return i
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }
