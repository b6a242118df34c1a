// Package usage reads token usage and the end of a stream out of OpenAI
// responses: plain JSON bodies, chat/completions SSE streams and Responses
// API streams. Its parsers never block or alter the bytes they are shown;
// AskForStreamUsage and HideStreamUsage (inject.go) ask upstream for a
// stream's usage the client did not ask for, and hide it again.
package usage

import (
	"bytes"
	"encoding/json"

	"github.com/tidwall/gjson"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// Usage is the token usage an OpenAI response reports.
type Usage struct {
	PromptTokens     int64
	CompletionTokens int64
	TotalTokens      int64
	CachedTokens     int64
	ReasoningTokens  int64
	// AudioInputTokens: of PromptTokens, audio not read from the prompt
	// cache (cached audio is in CachedTokens); AudioOutputTokens: of
	// CompletionTokens, audio. Both priced at the model's audio rates.
	AudioInputTokens  int64
	AudioOutputTokens int64
}

// IsZero reports whether no usage was seen.
func (u Usage) IsZero() bool { return u == Usage{} }

// FromObject reads a "usage" object in any of OpenAI's namings:
// chat/completions and embeddings (prompt_tokens, completion_tokens and
// their _details), the Responses API (input_tokens, output_tokens and
// their _details) and the Realtime API (input_token_details with the
// cached share broken down). One pass over the object: it is read for
// every answer.
func FromObject(u gjson.Result) (Usage, bool) {
	if !u.IsObject() {
		return Usage{}, false
	}
	var out Usage
	var cachedAudio int64
	u.ForEach(func(k, v gjson.Result) bool {
		switch k.Str {
		case "prompt_tokens", "input_tokens":
			out.PromptTokens = v.Int()
		case "completion_tokens", "output_tokens":
			out.CompletionTokens = v.Int()
		case "total_tokens":
			out.TotalTokens = v.Int()
		case "prompt_tokens_details", "input_tokens_details", "input_token_details":
			v.ForEach(func(k, v gjson.Result) bool {
				switch k.Str {
				case "cached_tokens":
					out.CachedTokens = v.Int()
				case "audio_tokens":
					out.AudioInputTokens = v.Int()
				case "cached_tokens_details":
					cachedAudio = v.Get("audio_tokens").Int()
				}
				return true
			})
		case "completion_tokens_details", "output_tokens_details", "output_token_details":
			v.ForEach(func(k, v gjson.Result) bool {
				switch k.Str {
				case "reasoning_tokens":
					out.ReasoningTokens = v.Int()
				case "audio_tokens":
					out.AudioOutputTokens = v.Int()
				}
				return true
			})
		}
		return true
	})
	// Cached audio is billed with the cached tokens, not again as audio.
	out.AudioInputTokens = max(0, out.AudioInputTokens-cachedAudio)
	if out.TotalTokens == 0 {
		out.TotalTokens = out.PromptTokens + out.CompletionTokens
	}
	return out, true
}

// Priced is the usage in the terms the price table quotes.
func (u Usage) Priced() models.TokenUsage {
	return models.TokenUsage{
		Input:       u.PromptTokens,
		CachedInput: u.CachedTokens,
		AudioInput:  u.AudioInputTokens,
		Output:      u.CompletionTokens,
		AudioOutput: u.AudioOutputTokens,
	}
}

// FromJSON reads the top-level "usage" of a whole JSON response body, or of
// a Responses API object nested under "response". Only the usage object
// is checked to be well-formed JSON: gjson finds it without recursing, and
// checking the whole body cost more than the rest of the reading.
func FromJSON(body []byte) (Usage, bool) {
	u := gjson.GetBytes(body, "usage")
	if !u.IsObject() {
		u = gjson.GetBytes(body, "response.usage")
	}
	if !u.IsObject() || !Valid(rawBytes(body, u)) {
		return Usage{}, false
	}
	return FromObject(u)
}

// rawBytes is r's raw JSON as a slice of body, where gjson knows its
// position (it does for a plain path), else a copy.
func rawBytes(body []byte, r gjson.Result) []byte {
	if r.Index > 0 && r.Index+len(r.Raw) <= len(body) {
		return body[r.Index : r.Index+len(r.Raw)]
	}
	return []byte(r.Raw)
}

// FromTail reads usage from the last bytes of a JSON body too large to keep
// whole. OpenAI puts "usage" after the bulky fields (choices, data, output),
// so the tail holds it; the last occurrence of the key is taken.
func FromTail(tail []byte) (Usage, bool) {
	// The last occurrence of "usage", found with forward searches:
	// bytes.Index is vectorised, bytes.LastIndex is not, and the key occurs
	// about once. The search is for usage" and the quote before it checked:
	// a leading quote, JSON's commonest byte, made it four times slower.
	key := []byte(`usage"`)
	i := -1
	for off := 0; ; {
		j := bytes.Index(tail[off:], key)
		if j < 0 {
			break
		}
		if at := off + j; at > 0 && tail[at-1] == '"' {
			i = at - 1
		}
		off += j + 1
	}
	if i < 0 {
		return Usage{}, false
	}
	rest := bytes.TrimLeft(tail[i+len(`"usage"`):], " \t\r\n")
	if len(rest) == 0 || rest[0] != ':' {
		return Usage{}, false
	}
	rest = bytes.TrimLeft(rest[1:], " \t\r\n")
	return FromObject(gjson.ParseBytes(rest))
}

// Valid reports whether b is one well-formed JSON value, nested at most
// 10,000 deep. It is encoding/json's check, not gjson.ValidBytes: gjson's
// validator recurses once per level of nesting, so a body of a few MiB of
// "[" grows a goroutine's stack by hundreds of MiB, and 8 MiB of them
// overflows it, a fatal error that ends the process.
func Valid(b []byte) bool { return json.Valid(b) }
