// Package usage reads token usage and the end of a stream out of OpenAI
// responses: plain JSON bodies, chat/completions SSE streams and Responses
// API streams. Its parsers never block or alter the bytes they are shown;
// AskForStreamUsage and HideStreamUsage (inject.go) ask upstream for a
// stream's usage the client did not ask for, and hide it again.
package usage

import (
	"bytes"

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

// FromObject reads a "usage" object in either naming: chat/completions and
// embeddings (prompt_tokens, completion_tokens) or the Responses API
// (input_tokens, output_tokens).
func FromObject(u gjson.Result) (Usage, bool) {
	if !u.IsObject() {
		return Usage{}, false
	}
	out := Usage{
		PromptTokens:     firstInt(u, "prompt_tokens", "input_tokens"),
		CompletionTokens: firstInt(u, "completion_tokens", "output_tokens"),
		TotalTokens:      u.Get("total_tokens").Int(),
		CachedTokens:     firstInt(u, "prompt_tokens_details.cached_tokens", "input_tokens_details.cached_tokens", "input_token_details.cached_tokens"),
		ReasoningTokens:  firstInt(u, "completion_tokens_details.reasoning_tokens", "output_tokens_details.reasoning_tokens"),
		// chat/completions says prompt_tokens_details, the Realtime API
		// input_token_details (with the cached share broken down).
		AudioInputTokens: max(0, firstInt(u, "prompt_tokens_details.audio_tokens", "input_token_details.audio_tokens")-
			u.Get("input_token_details.cached_tokens_details.audio_tokens").Int()),
		AudioOutputTokens: firstInt(u, "completion_tokens_details.audio_tokens", "output_token_details.audio_tokens"),
	}
	if out.TotalTokens == 0 {
		out.TotalTokens = out.PromptTokens + out.CompletionTokens
	}
	return out, true
}

func firstInt(u gjson.Result, paths ...string) int64 {
	for _, p := range paths {
		if v := u.Get(p); v.Exists() {
			return v.Int()
		}
	}
	return 0
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
// a Responses API object nested under "response".
func FromJSON(body []byte) (Usage, bool) {
	if !gjson.ValidBytes(body) {
		return Usage{}, false
	}
	if u, ok := FromObject(gjson.GetBytes(body, "usage")); ok {
		return u, true
	}
	return FromObject(gjson.GetBytes(body, "response.usage"))
}

// FromTail reads usage from the last bytes of a JSON body too large to keep
// whole. OpenAI puts "usage" after the bulky fields (choices, data, output),
// so the tail holds it; the last occurrence of the key is taken.
func FromTail(tail []byte) (Usage, bool) {
	i := bytes.LastIndex(tail, []byte(`"usage"`))
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
