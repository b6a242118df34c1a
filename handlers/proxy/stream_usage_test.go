package proxy_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// gpt-4.1 at $2 in and $8 out per 1M tokens: the fake upstream's stream of
// 10 deltas reports 5 prompt and 10 completion tokens.
const (
	unaskedStream = `{"model":"gpt-4.1","stream":true,"messages":[{"role":"user","content":"hi"}]}`
	askedStream   = `{"model":"gpt-4.1","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}`
	streamCost    = 5*2 + 10*8 // micro-dollars
)

// upstreamStream is the stream the fake upstream sends for the request it
// answered with x-request-id req_N, asked for usage or not.
func upstreamStream(requestID string, includeUsage bool) string {
	id := "chatcmpl-" + strings.TrimPrefix(requestID, "req_")
	return strings.Join(apptest.ChatStream(id, "gpt-4.1", 10, "", includeUsage), "")
}

func TestStreamUsageIsAskedForAndHiddenFromAClientThatDidNot(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	url := px.URL + "/v1/chat/completions?test_events=10"
	hdr := func(ua string) map[string]string {
		return map[string]string{"Content-Type": "application/json", "User-Agent": ua}
	}

	// The client did not ask: upstream is asked, every other byte of the
	// body as sent; the client gets the stream it asked for, byte for byte.
	resp, got := do(t, "POST", url, apptest.ClientKey, strings.NewReader(unaskedStream), hdr("unasked"))
	if want := upstreamStream(resp.Header.Get("X-Request-Id"), false); resp.StatusCode != 200 || string(got) != want {
		t.Fatalf("client that did not ask got %d:\n%s\nwant the stream without usage:\n%s", resp.StatusCode, got, want)
	}
	seen := up.Requests()[0]
	if want := strings.TrimSuffix(unaskedStream, "}") + `,"stream_options":{"include_usage":true}}`; string(seen.Body) != want || seen.BodyLen != len(want) {
		t.Fatalf("upstream got %q (%d bytes), want %q", seen.Body, seen.BodyLen, want)
	}

	// The client asked: nothing changes either way.
	resp, got = do(t, "POST", url, apptest.ClientKey, strings.NewReader(askedStream), hdr("asked"))
	if want := upstreamStream(resp.Header.Get("X-Request-Id"), true); string(got) != want || !strings.Contains(string(got), `"choices":[],"usage":{`) {
		t.Fatalf("client that asked got:\n%s\nwant:\n%s", got, want)
	}
	if seen := up.Requests()[1]; string(seen.Body) != askedStream {
		t.Fatalf("upstream got %q, want the body as sent", seen.Body)
	}

	// The Responses API always reports usage: its body goes as it is.
	responses := `{"model":"gpt-4.1","stream":true,"input":"x"}`
	do(t, "POST", px.URL+"/v1/responses?test_events=10", apptest.ClientKey, strings.NewReader(responses), hdr("responses"))
	if seen := up.Requests()[2]; string(seen.Body) != responses {
		t.Fatalf("responses: upstream got %q", seen.Body)
	}

	// Both streams are priced at the hand-computed figure.
	waitWritten(t, px, 3)
	rows := logRows(t, px)
	for _, name := range []string{"unasked", "asked"} {
		r := rows[name]
		if r.PromptTokens != 5 || r.CompletionTokens != 10 || r.CostMicros != streamCost || !r.Stream {
			t.Errorf("%s: tokens %d/%d cost %d µ$ stream %v, want 5/10 and %d", name, r.PromptTokens, r.CompletionTokens, r.CostMicros, r.Stream, streamCost)
		}
	}
	if r := rows["unasked"]; r.ResponseBytes != int64(len(upstreamStream("req_1", false))) {
		t.Errorf("unasked: %d response bytes logged, want what the client got", r.ResponseBytes)
	}
}

func TestStreamUsageOffForwardsStreamsAsSent(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"STREAM_USAGE": "off"})
	resp, got := do(t, "POST", px.URL+"/v1/chat/completions?test_events=10", apptest.ClientKey, strings.NewReader(unaskedStream),
		map[string]string{"Content-Type": "application/json", "User-Agent": "off"})
	if want := upstreamStream(resp.Header.Get("X-Request-Id"), false); string(got) != want {
		t.Fatalf("got:\n%s\nwant:\n%s", got, want)
	}
	if seen := up.Requests()[0]; string(seen.Body) != unaskedStream {
		t.Fatalf("upstream got %q, want the body as sent", seen.Body)
	}
	waitWritten(t, px, 1)
	if r := logRows(t, px)["off"]; r.CostMicros != 0 || r.TotalTokens != 0 {
		t.Fatalf("an unasked stream with STREAM_USAGE=off was priced: %+v", r)
	}
}

// TestStreamUsageKeyedReplayIsWhatTheClientSaw: the fingerprint is over the
// body the client sent, and the replay is the first answer, byte for byte,
// without the usage the proxy asked for.
func TestStreamUsageKeyedReplayIsWhatTheClientSaw(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	url := px.URL + "/v1/chat/completions?test_events=10"
	var ten map[string]string

	first := keyed(t, url, apptest.ClientKey, "usage-1", unaskedStream, ten)
	if want := upstreamStream(first.header.Get("X-Request-Id"), false); first.status != 200 || string(first.body) != want {
		t.Fatalf("first answer %d:\n%s\nwant:\n%s", first.status, first.body, want)
	}
	replay := keyed(t, url, apptest.ClientKey, "usage-1", unaskedStream, ten)
	if !replay.replayed || string(replay.body) != string(first.body) {
		t.Fatalf("replay (replayed=%v) differs from the first answer:\n%s", replay.replayed, replay.body)
	}
	// What went upstream is another request than the one the key holds.
	sent := string(up.Requests()[0].Body)
	if r := keyed(t, url, apptest.ClientKey, "usage-1", sent, ten); r.status != 422 {
		t.Fatalf("the rewritten body under the same key: %d, want 422", r.status)
	}
	if n := up.Calls(); n != 1 {
		t.Fatalf("upstream calls = %d, want 1", n)
	}
	waitWritten(t, px, 3)
	var cost []int64
	px.App.Store.DB().Raw("SELECT cost_micros FROM request_logs WHERE status = 200 ORDER BY id").Scan(&cost)
	if len(cost) != 2 || cost[0] != streamCost || cost[1] != 0 {
		t.Fatalf("costs %v µ$, want [%d 0] (the replay is free)", cost, streamCost)
	}
}

// TestStreamUsageHiddenFromTheSDK: the official SDK's accumulator reads a
// stream whose usage the proxy asked for as one without usage.
func TestStreamUsageHiddenFromTheSDK(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client := openai.NewClient(option.WithBaseURL(px.URL+"/v1"), option.WithAPIKey(apptest.ClientKey), option.WithMaxRetries(0))
	stream := client.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Say hello")},
		Model:    openai.ChatModelGPT4_1,
	}, option.WithQuery("test_events", "10"))
	var acc openai.ChatCompletionAccumulator
	chunks := 0
	for stream.Next() {
		chunk := stream.Current()
		if !acc.AddChunk(chunk) || len(chunk.Choices) == 0 || chunk.JSON.Usage.Raw() != "" {
			t.Fatalf("chunk %d: %s", chunks, chunk.RawJSON())
		}
		chunks++
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	if chunks != 11 || !strings.HasSuffix(acc.Choices[0].Message.Content, "tok9 ") || acc.Usage.TotalTokens != 0 {
		t.Fatalf("%d chunks, content %q, usage %+v", chunks, acc.Choices[0].Message.Content, acc.Usage)
	}
	waitWritten(t, px, 1)
	var cost int64
	px.App.Store.DB().Raw("SELECT cost_micros FROM request_logs").Scan(&cost)
	if cost != streamCost {
		t.Fatalf("cost %d µ$, want %d", cost, streamCost)
	}
}

// TestStreamUsageKeepsMasking: a stream whose usage was asked for is still
// masked, even when a key is split across upstream reads.
func TestStreamUsageKeepsMasking(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	_, got := do(t, "POST", px.URL+"/v1/chat/completions?test_echo_all=1", apptest.ClientKey, strings.NewReader(unaskedStream),
		map[string]string{"Content-Type": "application/json"})
	if !strings.HasSuffix(string(got), "data: [DONE]\n\n") || strings.Count(string(got), "data: ") != 4 {
		t.Fatalf("stream: %s", got)
	}
	assertNoSecrets(t, "stream whose usage was asked for", string(got))
	if !strings.Contains(string(up.Requests()[0].Body), `"include_usage":true`) {
		t.Fatal("usage was not asked for")
	}
}

// TestStreamUsageJoinerSeesWhatTheClientSaw: a repeat that joins the
// running attempt follows the capture, which is what the first client got.
func TestStreamUsageJoinerSeesWhatTheClientSaw(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	url := px.URL + "/v1/chat/completions?test_events=10&test_interval_ms=50"
	var slow map[string]string
	firstDone := make(chan result, 1)
	go func() { firstDone <- keyed(t, url, apptest.ClientKey, "usage-join", unaskedStream, slow) }()
	apptest.Eventually(t, 5*time.Second, func() bool { return up.Calls() == 1 }, "the first request did not reach upstream")
	joined := keyed(t, url, apptest.ClientKey, "usage-join", unaskedStream, slow)
	first := <-firstDone
	want := upstreamStream(first.header.Get("X-Request-Id"), false)
	if string(first.body) != want || string(joined.body) != want || !joined.replayed {
		t.Fatalf("first:\n%s\njoined (replayed=%v):\n%s\nwant:\n%s", first.body, joined.replayed, joined.body, want)
	}
	if n := up.Calls(); n != 1 {
		t.Fatalf("upstream calls = %d, want 1", n)
	}
}

// TestAudioTokensPricedAtAudioRates: audio tokens in a usage report cost
// the model's audio rates, in a JSON answer and in a stream's usage chunk.
func TestAudioTokensPricedAtAudioRates(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	hdr := func(ua string) map[string]string {
		return map[string]string{"Content-Type": "application/json", "User-Agent": ua}
	}
	do(t, "POST", px.URL+"/v1/chat/completions?test_audio=1", apptest.ClientKey,
		strings.NewReader(`{"model":"gpt-4o-audio-preview","messages":[{"role":"user","content":"hi"}]}`), hdr("json"))
	do(t, "POST", px.URL+"/v1/chat/completions?test_audio=1&test_events=10", apptest.ClientKey,
		strings.NewReader(`{"model":"gpt-4o-audio-preview","stream":true,"messages":[{"role":"user","content":"hi"}]}`), hdr("stream"))
	waitWritten(t, px, 2)
	rows := logRows(t, px)
	// gpt-4o-audio-preview: $2.50 text in (cached too: no cached rate),
	// $10 text out, $40 audio in, $80 audio out, per 1M tokens.
	for name, want := range map[string]int64{
		// 11 prompt: 3 cached, 5 audio, 3 text; 7 completion: 4 audio, 3 text.
		"json": 565, // 3*2.5 + 3*2.5 + 5*40 + 3*10 + 4*80
		// 5 prompt: 2 audio, 3 text; 10 completion: 6 audio, 4 text.
		"stream": 608, // 3*2.5 + 2*40 + 4*10 + 6*80 = 607.5, rounded
	} {
		if got := rows[name].CostMicros; got != want {
			t.Errorf("%s: cost %d µ$, want %d", name, got, want)
		}
	}
}
