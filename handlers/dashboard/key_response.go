package dashboard

import (
	"bytes"
	"encoding/json"
	"mime"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/openai-idempotent-proxy/proxy/handlers/scrub"
	"github.com/openai-idempotent-proxy/proxy/handlers/usage"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// storedResponse is a stored response body made readable. Templates print
// every field through html/template, so the body is always escaped.
type storedResponse struct {
	Kind   string // "json", "sse", "text", "binary" or "none"
	Text   string // pretty JSON or plain text
	Events []sseEvent
	Note   string // e.g. why nothing is shown, or that the view is cut short
}

// sseEvent is one server-sent event of a stored stream.
type sseEvent struct {
	N     int
	Event string
	ID    string
	Data  string // pretty-printed when it is JSON
}

// Display limits: a stored body can be IDEMPOTENCY_MAX_BODY (8 MiB by
// default) and a browser need not lay out all of it.
const (
	maxShownBytes   = 1 << 20
	maxShownEvents  = 500
	maxInflateBytes = 32 << 20
)

func parseStoredHeaders(s string) map[string]string {
	h := map[string]string{}
	_ = json.Unmarshal([]byte(s), &h)
	return h
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func headerValue(h map[string]string, name string) string {
	for k, v := range h {
		if strings.EqualFold(k, name) {
			return v
		}
	}
	return ""
}

// decodeStoredResponse turns a record's body into what the key page shows:
// JSON pretty-printed, an SSE stream as its list of events, other text as
// is, and binary as a size only.
func decodeStoredResponse(rec *models.IdempotencyRecord, headers map[string]string) storedResponse {
	body := rec.Body
	switch {
	case rec.State == models.StateCompleted && !rec.Replayable:
		return storedResponse{Kind: "none", Note: "The response was larger than IDEMPOTENCY_MAX_BODY, so it was not stored; retries with this key get 410 Gone."}
	case rec.State == models.StateReleased:
		return storedResponse{Kind: "none", Note: "No response is stored: the attempt was released without one, so the next request with this key executes again."}
	case len(body) == 0 && rec.State != models.StateCompleted:
		return storedResponse{Kind: "none", Note: "No response is stored: the request has not completed."}
	case len(body) == 0:
		return storedResponse{Kind: "none", Note: "The stored response has an empty body."}
	}
	var note string
	if enc := strings.ToLower(headerValue(headers, "Content-Encoding")); enc == "gzip" {
		plain, _, err := scrub.Gunzip(body, maxInflateBytes)
		if err != nil {
			return storedResponse{Kind: "binary", Note: "The stored body is gzip-compressed but could not be decompressed."}
		}
		body, note = plain, "Shown decompressed; it is stored and replayed gzip-compressed."
	}
	mt, _, _ := mime.ParseMediaType(headerValue(headers, "Content-Type"))
	switch {
	case mt == "text/event-stream" || (rec.Stream && mt == ""):
		events, cut := parseSSE(body)
		r := storedResponse{Kind: "sse", Events: events, Note: note}
		if cut {
			r.Note = joinNotes(note, "Only the first 500 events are shown.")
		}
		return r
	case json.Valid(body):
		var out bytes.Buffer
		if len(body) <= maxShownBytes && json.Indent(&out, body, "", "  ") == nil {
			return storedResponse{Kind: "json", Text: out.String(), Note: note}
		}
		return textResponse("json", body, note)
	case utf8.Valid(body):
		return textResponse("text", body, note)
	}
	return storedResponse{Kind: "binary", Note: joinNotes(note, "The body is binary and is not shown.")}
}

func textResponse(kind string, body []byte, note string) storedResponse {
	if len(body) > maxShownBytes {
		cut := body[:maxShownBytes]
		for len(cut) > 0 && !utf8.Valid(cut) {
			cut = cut[:len(cut)-1]
		}
		return storedResponse{Kind: kind, Text: string(cut), Note: joinNotes(note, "Only the first MiB is shown.")}
	}
	return storedResponse{Kind: kind, Text: string(body), Note: note}
}

func joinNotes(a, b string) string {
	if a == "" {
		return b
	}
	return a + " " + b
}

// parseSSE splits a stored event stream into events (the WHATWG
// event-stream format: fields per line, events separated by a blank
// line). It reports whether it stopped at maxShownEvents.
func parseSSE(body []byte) ([]sseEvent, bool) {
	text := strings.ReplaceAll(strings.ReplaceAll(string(body), "\r\n", "\n"), "\r", "\n")
	var events []sseEvent
	cut := false
	s := usage.Stream{OnEvent: func(e usage.Event) {
		if len(events) == maxShownEvents {
			cut = true
			return
		}
		ev := sseEvent{N: len(events) + 1, Event: e.Name, ID: e.ID, Data: string(e.Data)}
		var out bytes.Buffer
		if json.Valid(e.Data) && json.Indent(&out, e.Data, "", "  ") == nil {
			ev.Data = out.String()
		}
		events = append(events, ev)
	}}
	_, _ = s.Write([]byte(text + "\n\n")) // the blank line ends a last event left open
	return events, cut
}

// truncateRunes shortens s to at most n runes, marking the cut.
func truncateRunes(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	r := []rune(s)
	return string(r[:n-1]) + "…"
}
