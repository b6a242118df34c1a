package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/handlers/proxy"
	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// joinUpstream is an OpenAI-like upstream for the join tests: a streamed
// chat completion of events chunks, one every gap, or a JSON answer after
// delay. Its first call can fail: "cut" drops the connection after
// cutAfter events, "500" answers 500 (after delay). It counts executions
// and the events the running call has sent.
type joinUpstream struct {
	url              string
	events, cutAfter int
	gap, delay       time.Duration
	failFirst        string
	calls, sent      atomic.Int64
}

func newJoinUpstream(t *testing.T, u *joinUpstream) *joinUpstream {
	srv := httptest.NewServer(http.HandlerFunc(u.serve))
	t.Cleanup(srv.Close)
	u.url = srv.URL
	return u
}

func (u *joinUpstream) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	call := u.calls.Add(1)
	fail := ""
	if call == 1 {
		fail = u.failFirst
	}
	wait := func(d time.Duration) bool {
		select {
		case <-time.After(d):
			return true
		case <-r.Context().Done():
			return false
		}
	}
	if !bytes.Contains(body, []byte(`"stream":true`)) {
		if !wait(u.delay) {
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Request-Id", fmt.Sprintf("req-%d", call))
		if fail == "500" {
			w.WriteHeader(500)
			_, _ = io.WriteString(w, `{"error":{"message":"The server had an error","type":"server_error","code":null}}`)
			return
		}
		_, _ = fmt.Fprintf(w, `{"id":"chatcmpl-%d","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"answer %d"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}`, call, call)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("X-Request-Id", fmt.Sprintf("req-%d", call))
	flusher := w.(http.Flusher)
	u.sent.Store(0)
	for i := range u.events {
		_, _ = fmt.Fprintf(w, "data: {\"id\":\"chatcmpl-%d\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"e%d \"}}]}\n\n", call, i)
		flusher.Flush()
		u.sent.Add(1)
		if fail == "cut" && i+1 == u.cutAfter {
			conn, _, _ := w.(http.Hijacker).Hijack()
			_ = conn.Close()
			return
		}
		if i+1 < u.events && !wait(u.gap) {
			return
		}
	}
	_, _ = io.WriteString(w, "data: [DONE]\n\n")
}

// pair is where the two clients of a join test go: two instances on one
// PostgreSQL, or the one SQLite instance twice.
func pair(t *testing.T, upstream string, env map[string]string) (first, second *apptest.Instance) {
	first = apptest.Start(t, upstream, env)
	if env["DATABASE_URL"] == "" {
		return first, first
	}
	return first, apptest.Start(t, upstream, env)
}

// startStream sends a keyed streamed chat request and returns the open
// response.
func startStream(t *testing.T, ctx context.Context, url, key string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, "POST", url+"/v1/chat/completions", strings.NewReader(streamBody))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("stream request: %v", err)
	}
	return resp
}

// arrival is one read of a joiner's body, with how many events upstream
// had sent by then.
type arrival struct {
	n        int
	upstream int64
}

// readAll reads a body to its end, read by read.
func readAll(body io.Reader, up *joinUpstream) ([]byte, []arrival, error) {
	var out []byte
	var reads []arrival
	buf := make([]byte, 64<<10)
	for {
		n, err := body.Read(buf)
		if n > 0 {
			out = append(out, buf[:n]...)
			reads = append(reads, arrival{n, up.sent.Load()})
		}
		if err == io.EOF {
			return out, reads, nil
		}
		if err != nil {
			return out, reads, err
		}
	}
}

func TestRetryJoinsRunningStream(t *testing.T) {
	apptest.EachDB(t, nil, func(t *testing.T, env map[string]string) {
		up := newJoinUpstream(t, &joinUpstream{events: 40, gap: 50 * time.Millisecond})
		one, two := pair(t, up.url, env)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()

		// A reads five events, then drops.
		a := startStream(t, ctx, one.URL, "join-stream")
		lines := bufio.NewScanner(a.Body)
		for events := 0; events < 5 && lines.Scan(); {
			if strings.HasPrefix(lines.Text(), "data: ") {
				events++
			}
		}
		a.Body.Close()

		// B, the retry, on the other instance.
		asked := up.sent.Load()
		b := startStream(t, ctx, two.URL, "join-stream")
		got, reads, err := readAll(b.Body, up)
		b.Body.Close()
		if err != nil || b.StatusCode != 200 || b.Header.Get("Idempotent-Replayed") != "true" {
			t.Fatalf("joiner: %d replayed=%q err=%v\n%s", b.StatusCode, b.Header.Get("Idempotent-Replayed"), err, got)
		}
		if n := bytes.Count(got, []byte("\"chat.completion.chunk\"")); n != 40 || !bytes.HasSuffix(got, []byte("data: [DONE]\n\n")) {
			t.Fatalf("joiner got %d events, ends %q", n, got[max(0, len(got)-20):])
		}
		// Everything produced before B asked came in its first reads,
		// before the attempt ended; the rest followed as it was produced.
		if reads[0].upstream >= 40 {
			t.Fatalf("the joiner's first bytes came only after the attempt had ended (asked at event %d)", asked)
		}
		paced := map[int64]bool{}
		for _, r := range reads {
			paced[r.upstream] = true
		}
		if len(paced) < 10 {
			t.Fatalf("the joiner's body came in %d pieces of upstream progress, want it to follow the stream: %v", len(paced), reads)
		}
		if b.Header.Get("X-Request-Id") != "req-1" || !strings.HasPrefix(b.Header.Get("Content-Type"), "text/event-stream") {
			t.Fatalf("joiner headers: %v", b.Header)
		}

		replay := keyed(t, two.URL+"/v1/chat/completions", apptest.ClientKey, "join-stream", streamBody, nil)
		if !replay.replayed || !bytes.Equal(replay.body, got) {
			t.Fatalf("the replay differs from the joined stream:\n%s\n---\n%s", replay.body, got)
		}
		if n := up.calls.Load(); n != 1 {
			t.Fatalf("upstream calls = %d, want 1", n)
		}
		apptest.Eventually(t, 5*time.Second, func() bool {
			rec := recordFor(t, two, "join-stream")
			return rec.JoinCount == 1
		}, "the record does not count the join")
		apptest.Eventually(t, 5*time.Second, func() bool {
			return strings.Contains(scrape(t, two), `proxy_idempotency_total{result="joined"} 1`)
		}, "/metrics does not count the join")
		apptest.Eventually(t, 5*time.Second, func() bool { return joinedRows(t, two) == 1 }, "the request log has no joined row")
	})
}

func TestManyJoinersOverTwoInstances(t *testing.T) {
	apptest.EachDB(t, nil, func(t *testing.T, env map[string]string) {
		up := newJoinUpstream(t, &joinUpstream{events: 30, gap: 40 * time.Millisecond})
		one, two := pair(t, up.url, env)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()

		holder := startStream(t, ctx, one.URL, "join-many")
		first := make([]byte, 1)
		if _, err := io.ReadFull(holder.Body, first); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		bodies := make([][]byte, 50)
		errs := make([]error, 50)
		for i := range bodies {
			wg.Add(1)
			go func() {
				defer wg.Done()
				in := one
				if i%2 == 1 {
					in = two
				}
				resp := startStream(t, ctx, in.URL, "join-many")
				defer resp.Body.Close()
				bodies[i], _, errs[i] = readAll(resp.Body, up)
				if errs[i] == nil && resp.StatusCode != 200 {
					errs[i] = fmt.Errorf("status %d", resp.StatusCode)
				}
			}()
		}
		rest, err := io.ReadAll(holder.Body)
		holder.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		want := append(first, rest...)
		wg.Wait()
		for i := range bodies {
			if errs[i] != nil || !bytes.Equal(bodies[i], want) {
				t.Fatalf("joiner %d: err %v, %d bytes, want %d identical", i, errs[i], len(bodies[i]), len(want))
			}
		}
		if n := up.calls.Load(); n != 1 {
			t.Fatalf("upstream calls = %d, want 1", n)
		}
	})
}

func TestJoinersOfAKilledHolderAreCut(t *testing.T) {
	env := map[string]string{"DATABASE_URL": testdb.PostgresURL(t), "IDEMPOTENCY_LEASE": "2s"}
	up := newJoinUpstream(t, &joinUpstream{events: 40, gap: 50 * time.Millisecond})
	holder := apptest.Start(t, up.url, env)
	other := apptest.Start(t, up.url, env)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	a := startStream(t, ctx, holder.URL, "join-killed")
	defer a.Body.Close()
	b := startStream(t, ctx, other.URL, "join-killed")
	defer b.Body.Close()
	// The joiner follows; then the holder's process dies.
	joined := make([]byte, 1)
	if _, err := io.ReadFull(b.Body, joined); err != nil {
		t.Fatal(err)
	}
	holder.Kill(t)
	rest, _, err := readAll(b.Body, up)
	got := append(joined, rest...)
	if err == nil || bytes.Contains(got, []byte("[DONE]")) {
		t.Fatalf("the joiner of a dead holder ended cleanly (err %v):\n%s", err, got)
	}
	// After the lease, the retry executes, once.
	before := up.calls.Load()
	apptest.Eventually(t, 15*time.Second, func() bool {
		resp := startStream(t, ctx, other.URL, "join-killed")
		defer resp.Body.Close()
		body, _, err := readAll(resp.Body, up)
		return err == nil && resp.StatusCode == 200 && resp.Header.Get("Idempotent-Replayed") == "" && bytes.HasSuffix(body, []byte("data: [DONE]\n\n"))
	}, "no retry executed after the holder died")
	if n := up.calls.Load() - before; n != 1 {
		t.Fatalf("upstream calls after the crash = %d, want 1", n)
	}
}

// concurrently sends n same-key JSON chat requests spread over the
// instances.
func concurrently(t *testing.T, n int, key string, instances ...*apptest.Instance) []result {
	out := make([]result, n)
	var wg sync.WaitGroup
	for i := range out {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = keyed(t, instances[i%len(instances)].URL+"/v1/chat/completions", apptest.ClientKey, key, chatBody, nil)
		}()
	}
	wg.Wait()
	return out
}

func TestConcurrentJSONRetriesShareOneAnswer(t *testing.T) {
	apptest.EachDB(t, nil, func(t *testing.T, env map[string]string) {
		up := newJoinUpstream(t, &joinUpstream{delay: 3 * time.Second})
		one, two := pair(t, up.url, env)
		results := concurrently(t, 10, "join-json", one, two)
		executed := 0
		for i, r := range results {
			if r.status != 200 || !bytes.Equal(r.body, results[0].body) {
				t.Fatalf("call %d: %d %s, want 200 and the same body as call 0 (%s)", i, r.status, r.body, results[0].body)
			}
			if !r.replayed {
				executed++
			}
		}
		if executed != 1 || up.calls.Load() != 1 {
			t.Fatalf("%d answers not replayed, %d upstream calls; want 1 and 1", executed, up.calls.Load())
		}
	})
}

func TestUpstreamFailureReachesJoiners(t *testing.T) {
	apptest.EachDB(t, nil, func(t *testing.T, env map[string]string) {
		t.Run("500", func(t *testing.T) {
			up := newJoinUpstream(t, &joinUpstream{delay: time.Second, failFirst: "500"})
			one, two := pair(t, up.url, env)
			results := concurrently(t, 4, "join-500", one, two)
			for i, r := range results {
				if r.status != 500 || !bytes.Contains(r.body, []byte("The server had an error")) {
					t.Fatalf("call %d: %d %s, want the attempt's 500", i, r.status, r.body)
				}
			}
			retry := keyed(t, two.URL+"/v1/chat/completions", apptest.ClientKey, "join-500", chatBody, nil)
			if retry.status != 200 || retry.replayed || up.calls.Load() != 2 {
				t.Fatalf("retry: %d replayed=%v, %d upstream calls; want an execution", retry.status, retry.replayed, up.calls.Load())
			}
		})
		t.Run("stream cut", func(t *testing.T) {
			up := newJoinUpstream(t, &joinUpstream{events: 20, gap: 30 * time.Millisecond, failFirst: "cut", cutAfter: 10})
			one, two := pair(t, up.url, env)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			a := startStream(t, ctx, one.URL, "join-cut")
			defer a.Body.Close()
			b := startStream(t, ctx, two.URL, "join-cut")
			defer b.Body.Close()
			got, _, err := readAll(b.Body, up)
			if err == nil || bytes.Contains(got, []byte("[DONE]")) {
				t.Fatalf("the joiner of a cut stream ended cleanly (err %v):\n%s", err, got)
			}
			apptest.Eventually(t, 10*time.Second, func() bool {
				r := keyed(t, two.URL+"/v1/chat/completions", apptest.ClientKey, "join-cut", streamBody, nil)
				return r.status == 200 && !r.replayed && bytes.HasSuffix(r.body, []byte("data: [DONE]\n\n"))
			}, "the retry after a cut stream did not execute")
			if n := up.calls.Load(); n != 2 {
				t.Fatalf("upstream calls = %d, want 2", n)
			}
		})
	})
}

func TestJoinWaitIsBounded(t *testing.T) {
	for _, tc := range []struct{ wait, why string }{
		{"0", "strict mode: a repeat of a running key gets 409 at once"},
		{"500ms", "a JSON joiner waits at most IDEMPOTENCY_JOIN_WAIT"},
	} {
		t.Run(tc.wait, func(t *testing.T) {
			up := newJoinUpstream(t, &joinUpstream{delay: 3 * time.Second})
			px := apptest.Start(t, up.url, map[string]string{"IDEMPOTENCY_JOIN_WAIT": tc.wait})
			done := make(chan result, 1)
			go func() {
				done <- keyed(t, px.URL+"/v1/chat/completions", apptest.ClientKey, "join-bound", chatBody, nil)
			}()
			apptest.Eventually(t, 5*time.Second, func() bool { return up.calls.Load() == 1 }, "the first call never reached upstream")
			resp, b := do(t, "POST", px.URL+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chatBody),
				map[string]string{"Content-Type": "application/json", "Idempotency-Key": "join-bound"})
			assertAPIError(t, resp, b, 409, "idempotency_key_in_progress")
			if resp.Header.Get("Retry-After") == "" {
				t.Fatalf("%s: 409 without Retry-After", tc.why)
			}
			if first := <-done; first.status != 200 {
				t.Fatalf("first call: %d", first.status)
			}
		})
	}
}

// TestOfficialSDKRetriesJoin: the Go SDK with its default settings (two
// retries of a 409, about a second apart) against a 6 s call: without
// joining, three of four same-key calls failed with 409.
func TestOfficialSDKRetriesJoin(t *testing.T) {
	up := newJoinUpstream(t, &joinUpstream{delay: 6 * time.Second})
	px := apptest.Start(t, up.url, nil)
	client := openai.NewClient(option.WithBaseURL(px.URL+"/v1"), option.WithAPIKey(apptest.ClientKey))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	answers := make([]string, 4)
	errs := make([]error, 4)
	var wg sync.WaitGroup
	for i := range answers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			chat, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{
				Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
				Model:    openai.ChatModelGPT4oMini,
			}, option.WithHeader("Idempotency-Key", "sdk-join"))
			if err == nil {
				answers[i] = chat.ID
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	for i := range answers {
		if errs[i] != nil || answers[i] != answers[0] {
			t.Fatalf("call %d: %q, %v; want the one answer %q", i, answers[i], errs[i], answers[0])
		}
	}
	if n := up.calls.Load(); n != 1 {
		t.Fatalf("upstream calls = %d, want 1", n)
	}
}

// scrape reads the instance's /metrics.
func scrape(t *testing.T, px *apptest.Instance) string {
	t.Helper()
	_, body := do(t, "GET", px.URL+"/metrics", "", nil, nil)
	return string(body)
}

// joinedRows counts the request log's rows of joined requests.
func joinedRows(t *testing.T, px *apptest.Instance) int64 {
	t.Helper()
	var n int64
	if err := px.App.Store.DB().Model(&models.RequestLog{}).Where("outcome = ?", models.OutcomeJoined).Count(&n).Error; err != nil {
		t.Fatal(err)
	}
	return n
}

// slowWinStore holds back the answer of the claim that wins a key until
// the other request has asked four times (its three joins and the last
// try that answers 409 when nothing can be joined) or a second has gone
// by: the window between the claim's commit and the proxy's hold.
type slowWinStore struct {
	proxy.IdempotencyStore
	lost     atomic.Int64
	fourth   chan struct{}
	firstWin sync.Once
}

func (s *slowWinStore) ClaimIdempotency(ctx context.Context, r models.ClaimRequest) (bool, *models.IdempotencyRecord, error) {
	claimed, rec, err := s.IdempotencyStore.ClaimIdempotency(ctx, r)
	switch {
	case err != nil:
	case claimed:
		s.firstWin.Do(func() {
			select {
			case <-s.fourth:
			case <-time.After(time.Second): // the repeat joined: it asks no more
			}
		})
	case s.lost.Add(1) == 4:
		close(s.fourth)
	}
	return claimed, rec, err
}

// proxyOnStore serves a proxy in front of upstreamURL whose idempotency
// store is store (one with faults, say), and returns its base URL.
func proxyOnStore(t *testing.T, upstreamURL string, store proxy.IdempotencyStore) string {
	t.Helper()
	base, _ := url.Parse(upstreamURL)
	p := proxy.NewProxy(proxy.ProxyConfig{
		UpstreamBaseURL: base, UpstreamAPIKey: apptest.UpstreamKey,
		ClientKeys:  []handlers.ClientKey{{Name: "alpha", Key: apptest.ClientKey}},
		MaxBodySize: 1 << 20, UpstreamTimeout: time.Minute, FirstByteTimeout: time.Minute, IdleTimeout: time.Minute,
		IdempotencyTTL: time.Hour, IdempotencyLease: time.Minute, IdempotencyMaxBody: 1 << 20, IdempotencyJoinWait: time.Minute,
		BufferMemoryLimit: 64 << 20,
	}, store, nil, nil, slog.New(slog.DiscardHandler))
	f := fiber.New(fiber.Config{DisableStartupMessage: true, StreamRequestBody: true})
	f.All("/v1/*", p.Handle)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = f.Listener(ln) }()
	t.Cleanup(func() { _ = f.Shutdown() })
	return "http://" + ln.Addr().String()
}

// TestRepeatJoinsAClaimTheMomentItIsWon: a repeat that finds the key's
// record just committed, before the winner's process has registered the
// attempt, joins it instead of answering 409.
func TestRepeatJoinsAClaimTheMomentItIsWon(t *testing.T) {
	up := newJoinUpstream(t, &joinUpstream{delay: 100 * time.Millisecond})
	store := &slowWinStore{IdempotencyStore: testdb.SQLite(t, nil), fourth: make(chan struct{})}
	results := concurrently(t, 2, "won-just-now", &apptest.Instance{URL: proxyOnStore(t, up.url, store)})
	for i, r := range results {
		if r.status != 200 || !bytes.Equal(r.body, results[0].body) {
			t.Fatalf("call %d: %d %s, want 200 and the same body as the other", i, r.status, r.body)
		}
	}
	if n := up.calls.Load(); n != 1 {
		t.Fatalf("upstream calls = %d, want 1", n)
	}
}

// unstoredReleaseStore fails every release while blocked is set: the
// database down just as an attempt gives its key back. On PostgreSQL it
// is a LiveStore too (the embedded Store's methods), so replicas relay.
type unstoredReleaseStore struct {
	*models.Store
	blocked atomic.Bool
}

func (s *unstoredReleaseStore) ReleaseIdempotency(ctx context.Context, id, owner, reason string, ttl time.Duration) error {
	if s.blocked.Load() {
		return errors.New("the database is down")
	}
	return s.Store.ReleaseIdempotency(ctx, id, owner, reason, ttl)
}

// TestRetryBeforeTheReleaseIsStoredIsNotHandedTheFailure: an attempt that
// failed upstream (500) gives its key back, but the release cannot be
// written yet and is retried in the background. A retry meanwhile must not
// join the finished attempt and get its 500 as a replay (as if it were
// stored); it gets 409, and once the release is written it executes again.
func TestRetryBeforeTheReleaseIsStoredIsNotHandedTheFailure(t *testing.T) {
	up := apptest.NewUpstream(t)
	store := &unstoredReleaseStore{Store: testdb.SQLite(t, nil)}
	store.blocked.Store(true)
	url := proxyOnStore(t, up.URL, store) + "/v1/chat/completions?test_status=500&test_once=1&test_id=unstored-release"
	if first := keyed(t, url, apptest.ClientKey, "unstored-release", chatBody, nil); first.status != 500 || first.replayed {
		t.Fatalf("first attempt: %d replayed=%v, want the upstream's 500", first.status, first.replayed)
	}
	retry := keyed(t, url, apptest.ClientKey, "unstored-release", chatBody, nil)
	if retry.status != http.StatusConflict || retry.replayed {
		t.Fatalf("retry while the release is unstored: %d replayed=%v %s, want 409", retry.status, retry.replayed, retry.body)
	}
	store.blocked.Store(false) // the background retry writes the release
	executesAgainOnceReleased(t, up, url, "unstored-release")
}

// executesAgainOnceReleased retries key until the key is no longer in
// progress, and wants that retry to be the upstream's second execution.
func executesAgainOnceReleased(t *testing.T, up *apptest.Upstream, url, key string) {
	t.Helper()
	var again result
	apptest.Eventually(t, 10*time.Second, func() bool {
		again = keyed(t, url, apptest.ClientKey, key, chatBody, nil)
		return again.status != http.StatusConflict
	}, "the key stayed in progress after its release could be written")
	if again.status != 200 || again.replayed {
		t.Fatalf("retry after the release: %d replayed=%v, want a new execution", again.status, again.replayed)
	}
	if n := up.Calls(); n != 2 {
		t.Fatalf("upstream calls = %d, want 2", n)
	}
}

// TestRetryOnAnotherReplicaBeforeTheReleaseIsStored is the same on
// PostgreSQL across two replicas: a repeat on the second joined the
// attempt while it ran (and shares its 500, as its client got it), so the
// holder published it; a retry there after the attempt ended must not be
// served those published rows as a replay, but get 409 until the release
// is written, then execute.
func TestRetryOnAnotherReplicaBeforeTheReleaseIsStored(t *testing.T) {
	up := apptest.NewUpstream(t)
	shared := testdb.Postgres(t, nil)
	holder := &unstoredReleaseStore{Store: shared}
	holder.blocked.Store(true)
	path := "/v1/chat/completions?test_status=500&test_delay_ms=500&test_once=1&test_id=unstored-release-2"
	one, two := proxyOnStore(t, up.URL, holder)+path, proxyOnStore(t, up.URL, shared)+path
	const key = "unstored-release-replicas"

	first := make(chan result, 1)
	go func() { first <- keyed(t, one, apptest.ClientKey, key, chatBody, nil) }()
	apptest.Eventually(t, 5*time.Second, func() bool { return up.Calls() == 1 }, "the attempt never reached the upstream")
	if joined := keyed(t, two, apptest.ClientKey, key, chatBody, nil); joined.status != 500 || !joined.replayed {
		t.Fatalf("repeat on the other replica while the attempt ran: %d replayed=%v, want the attempt's 500, joined", joined.status, joined.replayed)
	}
	if r := <-first; r.status != 500 || r.replayed {
		t.Fatalf("first attempt: %d replayed=%v", r.status, r.replayed)
	}
	retry := keyed(t, two, apptest.ClientKey, key, chatBody, nil)
	if retry.status != http.StatusConflict || retry.replayed {
		t.Fatalf("retry on the other replica while the release is unstored: %d replayed=%v %s, want 409", retry.status, retry.replayed, retry.body)
	}
	holder.blocked.Store(false)
	executesAgainOnceReleased(t, up, two, key)
}
