package usage

import (
	"bytes"

	"github.com/tidwall/gjson"
)

// maxEvent bounds the bytes one SSE event may occupy while it is being
// assembled; a larger event is skipped (it still reaches the client).
const maxEvent = 1 << 20

// Stream watches a text/event-stream as it passes, event by event, however
// the bytes are chunked. It records the last usage reported and whether the
// stream reached its terminal event: "data: [DONE]" for chat/completions,
// or response.completed / response.incomplete / response.failed for the
// Responses API.
type Stream struct {
	pending  []byte // bytes of the event being assembled
	skipping bool   // the current event outgrew maxEvent
	lines    eventLines
	usage    Usage
	terminal bool
	events   int

	// OnEvent, if set, sees every event that has a field, in order.
	OnEvent func(Event)
}

// Event is one server-sent event.
type Event struct {
	Name, ID string
	Data     []byte // the data lines joined with "\n"; nil if it had none
}

// Write feeds the next bytes of the stream. It never fails.
func (s *Stream) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		line, eventEnd := s.lines.cut(p)
		s.add(p[:line])
		p = p[line:]
		if eventEnd {
			s.endEvent()
		}
	}
	return n, nil
}

func (s *Stream) add(b []byte) {
	if s.skipping {
		return
	}
	if len(s.pending)+len(b) > maxEvent {
		s.pending, s.skipping = s.pending[:0], true
		return
	}
	s.pending = append(s.pending, b...)
}

// endEvent handles one complete event; the blank line that ended it is the
// last line of pending.
func (s *Stream) endEvent() {
	ev := parseEvent(s.pending)
	s.pending, s.skipping = s.pending[:0], false
	if s.OnEvent != nil && (ev.Name != "" || ev.ID != "" || ev.Data != nil) {
		s.OnEvent(ev)
	}
	if ev.Data == nil {
		return
	}
	s.events++
	s.observe(ev.Data)
}

// parseEvent reads an event's fields: its name, its id and its data lines
// (SSE allows several), skipping comments and fields it does not know.
func parseEvent(raw []byte) Event {
	var ev Event
	for line := range bytes.Lines(raw) {
		line = bytes.TrimSuffix(bytes.TrimSuffix(line, []byte("\n")), []byte("\r"))
		if len(line) == 0 || line[0] == ':' {
			continue
		}
		field, value, _ := bytes.Cut(line, []byte(":"))
		value = bytes.TrimPrefix(value, []byte(" "))
		switch string(field) {
		case "event":
			ev.Name = string(value)
		case "id":
			ev.ID = string(value)
		case "data":
			if ev.Data == nil {
				ev.Data = make([]byte, 0, len(value))
			} else {
				ev.Data = append(ev.Data, '\n')
			}
			ev.Data = append(ev.Data, value...)
		}
	}
	return ev
}

func (s *Stream) observe(data []byte) {
	if bytes.Equal(bytes.TrimSpace(data), []byte("[DONE]")) {
		s.terminal = true
		return
	}
	if !bytes.Contains(data, []byte(`"response.`)) &&
		(!bytes.Contains(data, []byte(`"usage"`)) || bytes.HasSuffix(data, []byte(`,"usage":null}`))) {
		// The common case, not worth parsing: a content delta, without
		// usage or with the "usage":null that include_usage puts last in
		// every chunk but the usage chunk.
		return
	}
	obj := gjson.ParseBytes(data)
	switch obj.Get("type").String() {
	case "response.completed", "response.incomplete", "response.failed":
		s.terminal = true
	}
	if u, ok := FromObject(obj.Get("usage")); ok {
		s.usage = u
	} else if u, ok := FromObject(obj.Get("response.usage")); ok {
		s.usage = u
	}
}

// Usage returns the last usage the stream reported so far.
func (s *Stream) Usage() Usage { return s.usage }

// Terminal reports whether the stream's terminal event has passed.
func (s *Stream) Terminal() bool { return s.terminal }

// Events counts the events that carried data.
func (s *Stream) Events() int { return s.events }

// eventLines finds the ends of SSE events — blank lines, "\n\n" or with
// "\r\n" — in a stream that arrives in pieces: a line may be split over
// several of them, so its length is counted across them.
type eventLines struct {
	lineLen int  // bytes of the current line so far
	lineCR  bool // the current line starts with a carriage return
}

// cut returns how much of p belongs to the current line (through its
// '\n', or all of p when the line goes on), and whether that line ended
// an event.
func (l *eventLines) cut(p []byte) (n int, eventEnd bool) {
	if l.lineLen == 0 {
		l.lineCR = p[0] == '\r'
	}
	i := bytes.IndexByte(p, '\n')
	if i < 0 {
		l.lineLen += len(p)
		return len(p), false
	}
	length := l.lineLen + i
	l.lineLen = 0
	return i + 1, length == 0 || (length == 1 && l.lineCR)
}
