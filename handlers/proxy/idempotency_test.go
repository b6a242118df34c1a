package proxy_test

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

type result struct {
	status   int
	body     []byte
	replayed bool
	header   http.Header
}

func (r result) sha() [32]byte { return sha256.Sum256(r.body) }

// keyed sends a chat request with an Idempotency-Key.
func keyed(t *testing.T, url, clientKey, key, body string, hdr map[string]string) result {
	t.Helper()
	h := map[string]string{"Content-Type": "application/json"}
	if key != "" {
		h["Idempotency-Key"] = key
	}
	for k, v := range hdr {
		h[k] = v
	}
	resp, b := do(t, "POST", url, clientKey, strings.NewReader(body), h)
	return result{status: resp.StatusCode, body: b, replayed: resp.Header.Get("Idempotent-Replayed") == "true", header: resp.Header}
}

const chatBody = `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`
const streamBody = `{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}`

func TestIdempotentReplayIsByteIdentical(t *testing.T) {
	apptest.EachDB(t, nil, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		url := px.URL + "/v1/chat/completions"

		t.Run("json", func(t *testing.T) {
			first := keyed(t, url, apptest.ClientKey, "json-1", chatBody, nil)
			second := keyed(t, url, apptest.ClientKey, "json-1", chatBody, nil)
			if first.status != 200 || first.replayed {
				t.Fatalf("first: %d replayed=%v %s", first.status, first.replayed, first.body)
			}
			if second.status != 200 || !second.replayed || second.sha() != first.sha() {
				t.Fatalf("replay: %d replayed=%v\nfirst  %s\nsecond %s", second.status, second.replayed, first.body, second.body)
			}
			if second.header.Get("X-Request-Id") != first.header.Get("X-Request-Id") || second.header.Get("Content-Type") != first.header.Get("Content-Type") {
				t.Fatalf("replayed headers differ: %v vs %v", second.header, first.header)
			}
		})
		t.Run("sse", func(t *testing.T) {
			first := keyed(t, url+"?test_events=20", apptest.ClientKey, "sse-1", streamBody, nil)
			second := keyed(t, url+"?test_events=20", apptest.ClientKey, "sse-1", streamBody, nil)
			if first.status != 200 || !bytes.Contains(first.body, []byte("data: [DONE]")) {
				t.Fatalf("first: %d %s", first.status, first.body)
			}
			if !second.replayed || second.sha() != first.sha() || !strings.HasPrefix(second.header.Get("Content-Type"), "text/event-stream") {
				t.Fatalf("replay differs: replayed=%v ct=%q\n%s\n---\n%s", second.replayed, second.header.Get("Content-Type"), first.body, second.body)
			}
		})
		t.Run("responses api stream", func(t *testing.T) {
			body := `{"model":"gpt-4o-mini","stream":true,"input":"hi"}`
			first := keyed(t, px.URL+"/v1/responses", apptest.ClientKey, "resp-1", body, nil)
			second := keyed(t, px.URL+"/v1/responses", apptest.ClientKey, "resp-1", body, nil)
			if !second.replayed || second.sha() != first.sha() {
				t.Fatalf("replay differs:\n%s\n---\n%s", first.body, second.body)
			}
		})
		if n := up.Calls(); n != 3 {
			t.Fatalf("upstream calls = %d, want 3 (one per key)", n)
		}
	})
}

func TestIncompleteStreamsAreNeverReplayed(t *testing.T) {
	apptest.EachDB(t, nil, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		url := px.URL + "/v1/chat/completions"
		for _, tc := range []struct{ name, fault string }{
			{"no terminal event", "test_no_done=1"},
			{"connection dropped", "test_cut_after=2&test_events=5"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				key := "cut-" + strings.ReplaceAll(tc.name, " ", "-")
				// The fault hits the first attempt only: the retry repeats
				// the query, part of the request's fingerprint.
				url := url + "?test_once=1&test_id=" + key + "&" + tc.fault
				before := up.Calls()
				keyedStreamIgnoringErrors(t, url, key)
				// The retry, without the fault, executes and is stored.
				retry := keyed(t, url, apptest.ClientKey, key, streamBody, nil)
				if retry.replayed || retry.status != 200 || !bytes.Contains(retry.body, []byte("[DONE]")) {
					t.Fatalf("retry: %d replayed=%v %s", retry.status, retry.replayed, retry.body)
				}
				if got := up.Calls() - before; got != 2 {
					t.Fatalf("upstream calls = %d, want 2", got)
				}
				if again := keyed(t, url, apptest.ClientKey, key, streamBody, nil); !again.replayed || again.sha() != retry.sha() {
					t.Fatal("the completed retry is not replayed")
				}
			})
		}
	})
}

// keyedStreamIgnoringErrors reads a keyed stream to whatever end it has.
func keyedStreamIgnoringErrors(t *testing.T, url, key string) {
	t.Helper()
	req := chatRequest(t, url, streamBody, nil)
	req.Header.Set("Idempotency-Key", key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
}

func TestKeyMismatchIsRejected(t *testing.T) {
	// Strict mode, so the in-progress repeat below gets its 409 at once
	// (join_test.go covers joining).
	apptest.EachDB(t, map[string]string{"IDEMPOTENCY_JOIN_WAIT": "0"}, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		url := px.URL + "/v1/chat/completions"
		if r := keyed(t, url, apptest.ClientKey, "k-1", chatBody, nil); r.status != 200 {
			t.Fatalf("first: %d", r.status)
		}
		for _, tc := range []struct{ name, method, path, body string }{
			{"different body", "POST", "/v1/chat/completions", strings.Replace(chatBody, "hi", "bye", 1)},
			{"different path", "POST", "/v1/completions", chatBody},
			{"different method", "PATCH", "/v1/chat/completions", chatBody},
			{"different query", "POST", "/v1/chat/completions?x=1", chatBody},
		} {
			t.Run(tc.name, func(t *testing.T) {
				resp, b := do(t, tc.method, px.URL+tc.path, apptest.ClientKey, strings.NewReader(tc.body),
					map[string]string{"Content-Type": "application/json", "Idempotency-Key": "k-1"})
				assertAPIError(t, resp, b, 422, "idempotency_key_reused")
			})
		}
		// The conflict path: the key is in progress and the body differs.
		url += "?test_block=1"
		done := make(chan result)
		go func() {
			done <- keyed(t, url, apptest.ClientKey, "k-2", chatBody, nil)
		}()
		waitForCalls(t, up, 2)
		resp, b := do(t, "POST", url, apptest.ClientKey, strings.NewReader(`{"model":"other"}`),
			map[string]string{"Content-Type": "application/json", "Idempotency-Key": "k-2"})
		assertAPIError(t, resp, b, 422, "idempotency_key_reused")
		// The same body while in progress: 409 with Retry-After.
		resp, b = do(t, "POST", url, apptest.ClientKey, strings.NewReader(chatBody),
			map[string]string{"Content-Type": "application/json", "Idempotency-Key": "k-2"})
		assertAPIError(t, resp, b, 409, "idempotency_key_in_progress")
		if resp.Header.Get("Retry-After") == "" {
			t.Fatal("409 without Retry-After")
		}
		up.Release()
		if first := <-done; first.status != 200 {
			t.Fatalf("blocked request: %d", first.status)
		}
		if r := keyed(t, url, apptest.ClientKey, "k-2", chatBody, nil); !r.replayed {
			t.Fatal("completed key not replayed")
		}
		if n := up.Calls(); n != 2 {
			t.Fatalf("upstream calls = %d, want 2", n)
		}
	})
}

// waitForCalls waits until the upstream has received n requests.
func waitForCalls(t *testing.T, up *apptest.Upstream, n int64) {
	t.Helper()
	apptest.Eventually(t, 10*time.Second, func() bool { return up.Calls() >= n }, "upstream saw fewer than %d calls", n)
}

func multipartUpload(t *testing.T, content, purpose string) (string, *bytes.Buffer) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf) // a new random boundary every time
	_ = mw.WriteField("purpose", purpose)
	fw, _ := mw.CreateFormFile("file", "data.jsonl")
	_, _ = fw.Write([]byte(content))
	_ = mw.Close()
	return mw.FormDataContentType(), &buf
}

func TestMultipartRetryWithNewBoundaryIsAReplay(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	send := func(content, purpose string) (*http.Response, []byte) {
		ct, body := multipartUpload(t, content, purpose)
		return do(t, "POST", px.URL+"/v1/files", apptest.ClientKey, body, map[string]string{"Content-Type": ct, "Idempotency-Key": "upload-1"})
	}
	r1, b1 := send(`{"a":1}`, "batch")
	r2, b2 := send(`{"a":1}`, "batch")
	if r1.StatusCode != 200 || r2.Header.Get("Idempotent-Replayed") != "true" || !bytes.Equal(b1, b2) {
		t.Fatalf("retry with new boundary: %d %d replayed=%q", r1.StatusCode, r2.StatusCode, r2.Header.Get("Idempotent-Replayed"))
	}
	r3, b3 := send(`{"a":2}`, "batch")
	assertAPIError(t, r3, b3, 422, "idempotency_key_reused")
	r4, b4 := send(`{"a":1}`, "fine-tune")
	assertAPIError(t, r4, b4, 422, "idempotency_key_reused")
	if n := up.Calls(); n != 1 {
		t.Fatalf("upstream calls = %d, want 1", n)
	}
}

func TestIdempotencyKeyForms(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	url := px.URL + "/v1/chat/completions"
	for _, bad := range []string{"", strings.Repeat("k", 256), "naïve", "tab\there", `"unterminated`, `"bad\escape"`, `""`} {
		resp, b := do(t, "POST", url, apptest.ClientKey, strings.NewReader(chatBody), map[string]string{"Content-Type": "application/json", "Idempotency-Key": bad})
		assertAPIError(t, resp, b, 400, "invalid_idempotency_key")
	}
	// Two Idempotency-Key fields are refused too.
	req, _ := http.NewRequest("POST", url, strings.NewReader(chatBody))
	req.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
	req.Header.Add("Idempotency-Key", "a1")
	req.Header.Add("Idempotency-Key", "a2")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Fatalf("two keys: status %d", resp.StatusCode)
	}
	if up.Calls() != 0 {
		t.Fatalf("invalid keys reached upstream %d times", up.Calls())
	}
	// The quoted Structured Field form and the bare form are one key.
	if r := keyed(t, url, apptest.ClientKey, "abc-123", chatBody, nil); r.status != 200 || r.replayed {
		t.Fatalf("bare: %d", r.status)
	}
	if r := keyed(t, url, apptest.ClientKey, `"abc-123"`, chatBody, nil); !r.replayed {
		t.Fatal("quoted form of the same key was not replayed")
	}
	// Another client's identical key is its own.
	if r := keyed(t, url, apptest.ClientKey2, "abc-123", chatBody, nil); r.status != 200 || r.replayed {
		t.Fatalf("second client: %d replayed=%v", r.status, r.replayed)
	}
	// GET ignores the header.
	resp2, _ := do(t, "GET", px.URL+"/v1/models", apptest.ClientKey, nil, map[string]string{"Idempotency-Key": "abc-123"})
	resp3, _ := do(t, "GET", px.URL+"/v1/models", apptest.ClientKey, nil, map[string]string{"Idempotency-Key": "abc-123"})
	if resp2.Header.Get("Idempotent-Replayed") != "" || resp3.Header.Get("Idempotent-Replayed") != "" {
		t.Fatal("GET was replayed")
	}
	if n := up.Calls(); n != 4 {
		t.Fatalf("upstream calls = %d, want 4", n)
	}
}

func TestRetryableFailuresAreReleased(t *testing.T) {
	apptest.EachDB(t, nil, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		url := px.URL + "/v1/chat/completions"
		for _, status := range []string{"500", "429", "503", "401"} {
			key := "fail-" + status
			// Only the first attempt fails; the retry repeats the query.
			url := url + "?test_once=1&test_id=" + key + "&test_status=" + status
			r := keyed(t, url, apptest.ClientKey, key, chatBody, nil)
			if fmt.Sprint(r.status) != status {
				t.Fatalf("status %d, want %s", r.status, status)
			}
			retry := keyed(t, url, apptest.ClientKey, key, chatBody, nil)
			if retry.status != 200 || retry.replayed {
				t.Fatalf("retry after %s: %d replayed=%v", status, retry.status, retry.replayed)
			}
			rec := recordFor(t, px, key)
			if rec.State != models.StateCompleted || rec.Attempts != 2 {
				t.Fatalf("record after retry: state %s attempts %d", rec.State, rec.Attempts)
			}
		}
		// A deterministic 4xx is stored and replayed.
		r := keyed(t, url+"?test_status=400", apptest.ClientKey, "bad-request", chatBody, nil)
		again := keyed(t, url+"?test_status=400", apptest.ClientKey, "bad-request", chatBody, nil)
		if r.status != 400 || again.status != 400 || !again.replayed || again.sha() != r.sha() {
			t.Fatalf("400 not replayed: %d %d %v", r.status, again.status, again.replayed)
		}
		if n := up.Calls(); n != 9 {
			t.Fatalf("upstream calls = %d, want 9", n)
		}
	})
}

// recordFor finds the idempotency record of a key.
func recordFor(t *testing.T, px *apptest.Instance, key string) models.IdempotencyRecord {
	t.Helper()
	var rec models.IdempotencyRecord
	if err := px.App.Store.DB().Where("idem_key = ?", key).Take(&rec).Error; err != nil {
		t.Fatalf("record for %s: %v", key, err)
	}
	return rec
}

func TestKeyedStreamRunsToTheEndWithoutItsClient(t *testing.T) {
	apptest.EachDB(t, nil, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		url := px.URL + "/v1/chat/completions?test_events=30&test_interval_ms=20"

		req := chatRequest(t, url, streamBody, nil)
		req.Header.Set("Idempotency-Key", "gone-1")
		abandonAfterEvents(t, req, 2) // the client gives up after two events

		select {
		case <-up.Requests()[0].Ended:
		case <-time.After(10 * time.Second):
			t.Fatal("upstream did not finish")
		}
		if up.Cancelled() != 0 || up.Completed() != 1 {
			t.Fatalf("upstream cancelled=%d completed=%d: a keyed stream must run to its end", up.Cancelled(), up.Completed())
		}
		// The retry replays the whole stream once it is stored.
		var retry result
		apptest.Eventually(t, 10*time.Second, func() bool {
			retry = keyed(t, url, apptest.ClientKey, "gone-1", streamBody, nil)
			return retry.status != 409
		}, "retry: still 409, the stream was never stored")
		if !retry.replayed || !bytes.Contains(retry.body, []byte("tok29")) || !bytes.HasSuffix(retry.body, []byte("data: [DONE]\n\n")) {
			t.Fatalf("retry: %d replayed=%v %s", retry.status, retry.replayed, retry.body)
		}
		if up.Calls() != 1 {
			t.Fatalf("upstream calls = %d, want 1", up.Calls())
		}
	})
}

func TestExactlyOnceAcrossTwoInstances(t *testing.T) {
	dbURL := testdb.PostgresURL(t)
	up := apptest.NewUpstream(t)
	a := apptest.Start(t, up.URL, map[string]string{"DATABASE_URL": dbURL})
	b := apptest.Start(t, up.URL, map[string]string{"DATABASE_URL": dbURL})
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 100}}

	const trials, concurrency = 15, 100
	for trial := 0; trial < trials; trial++ {
		key := fmt.Sprintf("race-%d", trial)
		before := up.Calls()
		results := make([]result, concurrency)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := 0; i < concurrency; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				target := a.URL
				if i%2 == 1 {
					target = b.URL
				}
				req, _ := http.NewRequest("POST", target+"/v1/chat/completions?test_delay_ms=30", strings.NewReader(chatBody))
				req.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("Idempotency-Key", key)
				<-start
				resp, err := client.Do(req)
				if err != nil {
					t.Errorf("request: %v", err)
					return
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				results[i] = result{status: resp.StatusCode, body: body, replayed: resp.Header.Get("Idempotent-Replayed") == "true"}
			}(i)
		}
		close(start)
		wg.Wait()
		if got := up.Calls() - before; got != 1 {
			t.Fatalf("trial %d: %d upstream executions, want exactly 1", trial, got)
		}
		var original *result
		for i := range results {
			if results[i].status == 200 && !results[i].replayed {
				if original != nil {
					t.Fatalf("trial %d: two unreplayed 200s", trial)
				}
				original = &results[i]
			}
		}
		if original == nil {
			t.Fatalf("trial %d: no request executed", trial)
		}
		for i, r := range results {
			switch {
			case r.status == 409:
			case r.status == 200 && r.replayed && r.sha() == original.sha():
			case &results[i] == original:
			default:
				t.Fatalf("trial %d: answer %d is %d replayed=%v %s", trial, i, r.status, r.replayed, r.body)
			}
		}
	}
}

func TestLeaseTakeoverAfterHolderCrash(t *testing.T) {
	dbURL := testdb.PostgresURL(t)
	up := apptest.NewUpstream(t)
	// Strict mode: the lease's effect is seen as 409s (joiners of a dead
	// holder are covered in join_test.go).
	env := map[string]string{"DATABASE_URL": dbURL, "IDEMPOTENCY_LEASE": "2s", "IDEMPOTENCY_JOIN_WAIT": "0"}
	holder := apptest.Start(t, up.URL, env)
	other := apptest.Start(t, up.URL, env)
	// The holder's call blocks; the takeover's, a second call, does not.
	url := "/v1/chat/completions?test_block=1&test_once=1&test_id=crash-1"

	go func() {
		// The holder's client gets no answer: the holder dies mid-request.
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, "POST", holder.URL+url, strings.NewReader(chatBody))
		req.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", "crash-1")
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	waitForCalls(t, up, 1)
	// While the holder lives and renews, the lease never lapses.
	time.Sleep(3 * time.Second) // longer than the lease: renewal is what keeps it
	if r := keyed(t, other.URL+url, apptest.ClientKey, "crash-1", chatBody, nil); r.status != 409 {
		t.Fatalf("live holder: status %d, want 409", r.status)
	}
	holder.Kill(t)
	killed := time.Now()
	if r := keyed(t, other.URL+url, apptest.ClientKey, "crash-1", chatBody, nil); r.status != 409 {
		t.Fatalf("right after the crash: status %d, want 409 until the lease lapses", r.status)
	}
	var took time.Duration
	apptest.Eventually(t, time.Until(killed.Add(15*time.Second)), func() bool {
		r := keyed(t, other.URL+url, apptest.ClientKey, "crash-1", chatBody, nil)
		if r.status == 200 && !r.replayed {
			took = time.Since(killed)
			return true
		}
		if r.status != 409 {
			t.Fatalf("takeover: status %d after %v", r.status, time.Since(killed))
		}
		return false
	}, "takeover: still 409 15 s after the crash")
	// The last renewal was at most a third of the lease before the crash.
	if took < 2*time.Second/3 {
		t.Fatalf("taken over %v after the crash: before the lease lapsed", took)
	}
	if n := up.Calls(); n != 2 {
		t.Fatalf("upstream calls = %d, want 2 (the crashed attempt and the takeover)", n)
	}
	if rec := recordFor(t, other, "crash-1"); rec.Attempts != 2 || rec.State != models.StateCompleted {
		t.Fatalf("record: attempts %d state %s", rec.Attempts, rec.State)
	}
}

func TestDatabaseDown(t *testing.T) {
	dbURL, fwd := testdb.ThroughForwarder(t, testdb.PostgresURL(t))
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"DATABASE_URL": dbURL})
	url := px.URL + "/v1/chat/completions"

	fwd.Down()
	resp, b := do(t, "POST", url, apptest.ClientKey, strings.NewReader(chatBody), map[string]string{"Content-Type": "application/json", "Idempotency-Key": "db-1"})
	assertAPIError(t, resp, b, 503, "idempotency_unavailable")
	if up.Calls() != 0 {
		t.Fatal("keyed request executed without the database")
	}
	if r := keyed(t, url, apptest.ClientKey, "", chatBody, nil); r.status != 200 {
		t.Fatalf("unkeyed request with the database down: %d", r.status)
	}
	ready, _ := do(t, "GET", px.URL+"/readyz", "", nil, nil)
	if ready.StatusCode != 503 {
		t.Fatalf("/readyz with the database down: %d", ready.StatusCode)
	}

	fwd.Up()
	var r result
	apptest.Eventually(t, 10*time.Second, func() bool {
		r = keyed(t, url, apptest.ClientKey, "db-1", chatBody, nil)
		return r.status != 503
	}, "after recovery: still 503")
	if r.status != 200 || r.replayed {
		t.Fatalf("after recovery: %d replayed=%v", r.status, r.replayed)
	}
	if r2 := keyed(t, url, apptest.ClientKey, "db-1", chatBody, nil); !r2.replayed {
		t.Fatal("not replayed after recovery")
	}
}

func TestResponsesTooLargeToStoreAreNeverRunTwice(t *testing.T) {
	apptest.EachDB(t, nil, func(t *testing.T, env map[string]string) {
		env["IDEMPOTENCY_MAX_BODY"] = "2KiB"
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		url := px.URL + "/v1/chat/completions"
		huge := url + "?test_events=100" // ~17 KiB of SSE
		first := keyed(t, huge, apptest.ClientKey, "huge-1", streamBody, nil)
		if first.status != 200 || !bytes.HasSuffix(first.body, []byte("data: [DONE]\n\n")) || len(first.body) < 4<<10 {
			t.Fatalf("first client: %d, %d bytes", first.status, len(first.body))
		}
		retry := keyed(t, huge, apptest.ClientKey, "huge-1", streamBody, nil)
		if retry.status != 410 || !strings.Contains(string(retry.body), "idempotency_response_not_stored") {
			t.Fatalf("retry: %d %s", retry.status, retry.body)
		}
		if up.Calls() != 1 {
			t.Fatalf("upstream calls = %d, want 1", up.Calls())
		}
		rec := recordFor(t, px, "huge-1")
		if rec.State != models.StateCompleted || rec.Replayable || rec.BodySize != int64(len(first.body)) || len(rec.Body) != 0 {
			t.Fatalf("record: state %s replayable %v size %d stored %d", rec.State, rec.Replayable, rec.BodySize, len(rec.Body))
		}
		// A small answer under the same cap is stored as usual.
		small := keyed(t, url, apptest.ClientKey, "small-1", chatBody, nil)
		if again := keyed(t, url, apptest.ClientKey, "small-1", chatBody, nil); !again.replayed || again.sha() != small.sha() {
			t.Fatal("small response not replayed")
		}
	})
}

// TestOutageDuringAKeyedRequest: the database goes away while a keyed call
// runs upstream. The answer still reaches the client, its record is written
// once the database is back, and retries replay it: the key never runs twice.
func TestOutageDuringAKeyedRequest(t *testing.T) {
	dbURL, fwd := testdb.ThroughForwarder(t, testdb.PostgresURL(t))
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"DATABASE_URL": dbURL})
	url := px.URL + "/v1/chat/completions?test_block=1"
	done := make(chan result)
	go func() {
		done <- keyed(t, url, apptest.ClientKey, "outage-1", chatBody, nil)
	}()
	waitForCalls(t, up, 1)
	fwd.Down()
	up.Release()
	first := <-done
	if first.status != 200 {
		t.Fatalf("first answer during the outage: %d %s", first.status, first.body)
	}
	fwd.Up()
	var r result
	apptest.Eventually(t, 15*time.Second, func() bool {
		r = keyed(t, url, apptest.ClientKey, "outage-1", chatBody, nil)
		return r.status != 409 && r.status != 503
	}, "after the outage: still 409 or 503")
	if !r.replayed || r.sha() != first.sha() {
		t.Fatalf("after the outage: %d replayed=%v", r.status, r.replayed)
	}
	if up.Calls() != 1 {
		t.Fatalf("upstream calls = %d: the key ran twice", up.Calls())
	}
}

// TestShortTTLNeverRunsARunningCallTwice: IDEMPOTENCY_TTL counts from
// completion, and a live lease always wins. A keyed stream that runs longer
// than the TTL is still in progress for its retries (they join it), a different body
// is a reuse of the key (422, as on every path), and once it ends the retry
// replays it: one upstream execution.
func TestShortTTLNeverRunsARunningCallTwice(t *testing.T) {
	apptest.EachDB(t, nil, func(t *testing.T, env map[string]string) {
		env["IDEMPOTENCY_TTL"] = "1s"
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		url := px.URL + "/v1/chat/completions?test_events=30&test_interval_ms=100" // about 3 s

		req := chatRequest(t, url, streamBody, nil)
		req.Header.Set("Idempotency-Key", "short-ttl")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		br := bufio.NewReader(resp.Body)
		var first bytes.Buffer
		// Read 15 events (about 1.5 s): longer than the TTL since the claim.
		for seen := 0; seen < 15; {
			line, err := br.ReadString('\n')
			if err != nil {
				t.Fatalf("first stream: %v", err)
			}
			first.WriteString(line)
			if strings.HasPrefix(line, "data: ") {
				seen++
			}
		}
		// The retry joins the running call: the whole stream, not executed.
		retry := keyed(t, url, apptest.ClientKey, "short-ttl", streamBody, nil)
		if retry.status != 200 || !retry.replayed {
			t.Errorf("retry past the TTL of a running call: %d replayed=%v, want it joined", retry.status, retry.replayed)
		}
		other := keyed(t, url, apptest.ClientKey, "short-ttl", chatBody, nil)
		if other.status != 422 {
			t.Errorf("different body while running: %d, want 422", other.status)
		}
		rest, err := io.ReadAll(br)
		if err != nil {
			t.Fatal(err)
		}
		first.Write(rest)
		if again := keyed(t, url, apptest.ClientKey, "short-ttl", streamBody, nil); !again.replayed || again.sha() != sha256.Sum256(first.Bytes()) {
			t.Errorf("after the end: %d replayed=%v", again.status, again.replayed)
		}
		if retry.sha() != sha256.Sum256(first.Bytes()) {
			t.Errorf("the joined retry differs from the stream:\n%s\n---\n%s", retry.body, first.Bytes())
		}
		if n := up.Calls(); n != 1 {
			t.Errorf("upstream executions = %d, want 1", n)
		}
	})
}

// TestShutdownSettlesKeyedCallsStillRunning: SIGTERM during a keyed stream
// longer than SHUTDOWN_GRACE. The proxy releases the key (reason shutdown)
// and writes the request's log row before it exits, so the retry on the
// next instance executes at once instead of waiting out the lease.
func TestShutdownSettlesKeyedCallsStillRunning(t *testing.T) {
	apptest.EachDB(t, nil, func(t *testing.T, env map[string]string) {
		env["DATA_DIR"] = t.TempDir() // shared by both instances on SQLite
		env["SHUTDOWN_GRACE"] = "1s"
		up := apptest.NewUpstream(t)
		first := apptest.Start(t, up.URL, env)
		// About 10 s, for the first call only: the retry repeats the query.
		steer := "?test_events=100&test_interval_ms=100&test_once=1&test_id=sigterm-1"
		req := chatRequest(t, first.URL+"/v1/chat/completions"+steer, streamBody, nil)
		req.Header.Set("Idempotency-Key", "sigterm-1")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if _, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil { // the stream is flowing
			t.Fatal(err)
		}
		first.Stop(t) // SIGTERM: the grace ends with the stream still running

		next := apptest.Start(t, up.URL, env)
		rec := recordFor(t, next, "sigterm-1")
		if rec.State != models.StateReleased || rec.ReleaseReason != "shutdown" {
			t.Errorf("record after shutdown: state %s reason %q, want released/shutdown", rec.State, rec.ReleaseReason)
		}
		var logged []models.RequestLog
		if err := next.App.Store.DB().Where("idempotency_key = ?", "sigterm-1").Find(&logged).Error; err != nil {
			t.Fatal(err)
		}
		if len(logged) != 1 || !strings.Contains(logged[0].Error, "shutdown") {
			t.Errorf("log rows after shutdown: %+v, want one naming the shutdown", logged)
		}
		// The retry executes at once: no 409 while a dead lease runs out.
		retry := keyed(t, next.URL+"/v1/chat/completions"+steer, apptest.ClientKey, "sigterm-1", streamBody, nil)
		if retry.status != 200 || retry.replayed || !bytes.Contains(retry.body, []byte("data: [DONE]")) {
			t.Fatalf("retry after shutdown: %d replayed=%v", retry.status, retry.replayed)
		}
	})
}

// rawUpstream answers every request with the raw HTTP response that answer
// returns for its call number (1, 2, …) and closes the connection: a server
// that frames bodies by closing (no Content-Length, not chunked), or speaks
// statuses the fake OpenAI upstream does not.
func rawUpstream(t *testing.T, answer func(call int) string) (url string, calls func() int) {
	t.Helper()
	var mu sync.Mutex
	n := 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		mu.Lock()
		n++
		call := n
		mu.Unlock()
		conn, _, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		_, _ = io.WriteString(conn, answer(call))
	}))
	t.Cleanup(srv.Close)
	return srv.URL, func() int { mu.Lock(); defer mu.Unlock(); return n }
}

// TestCutCloseDelimitedJSONIsNeverReplayed: a JSON 200 framed by closing the
// connection, cut mid-body, looks complete to the transport; it is not
// valid JSON, so the key is released instead of storing it as a success.
func TestCutCloseDelimitedJSONIsNeverReplayed(t *testing.T) {
	full := `{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hello"}}]}`
	var zipped bytes.Buffer
	zw := gzip.NewWriter(&zipped)
	_, _ = zw.Write([]byte(full))
	_ = zw.Close()
	for _, tc := range []struct{ name, coding, body string }{
		{"plain", "", full},
		// Decoded by the proxy before it is captured: a gzip stream cut
		// mid-way is a read error, never a stored answer.
		{"gzip", "Content-Encoding: gzip\r\n", zipped.String()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			upURL, calls := rawUpstream(t, func(call int) string {
				body := tc.body
				if call == 1 {
					body = body[:len(body)/2] // the connection drops mid-body
				}
				return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + tc.coding + "Connection: close\r\n\r\n" + body
			})
			px := apptest.Start(t, upURL, nil)
			url := px.URL + "/v1/chat/completions"
			// The client sees the cut: a plain body passes as it came (200,
			// its first half); a cut gzip stream fails to decode, so the
			// client gets a short body or a read error.
			resp, err := http.DefaultClient.Do(chatRequest(t, url, chatBody, map[string]string{"Idempotency-Key": "cut-json"}))
			var b []byte
			if err == nil {
				b, err = io.ReadAll(resp.Body)
				resp.Body.Close()
			}
			switch {
			case tc.coding == "" && (err != nil || resp.StatusCode != 200 || string(b) != full[:len(full)/2]):
				t.Fatalf("cut answer: %v %q", err, b)
			case string(b) == full:
				t.Fatalf("the cut answer came whole")
			}
			retry := keyed(t, url, apptest.ClientKey, "cut-json", chatBody, nil)
			if retry.replayed || string(retry.body) != full {
				t.Fatalf("retry after a cut JSON body: %d replayed=%v %s", retry.status, retry.replayed, retry.body)
			}
			if again := keyed(t, url, apptest.ClientKey, "cut-json", chatBody, nil); !again.replayed || string(again.body) != full {
				t.Fatalf("the complete answer is not replayed: replayed=%v %s", again.replayed, again.body)
			}
			if rec := recordFor(t, px, "cut-json"); rec.Attempts != 2 {
				t.Fatalf("attempts %d, want 2", rec.Attempts)
			}
			if n := calls(); n != 2 {
				t.Fatalf("upstream calls = %d, want 2", n)
			}
		})
	}
}

// TestWholeJSONIsStoredAsItCame: a JSON 200 with a Content-Length that
// arrived whole is the upstream's answer even when it does not parse (a
// buggy server, a body cut before it was framed): the retry replays it,
// and the call runs once. Only a body framed by the close is checked.
func TestWholeJSONIsStoredAsItCame(t *testing.T) {
	const body = `{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,`
	upURL, calls := rawUpstream(t, func(int) string {
		return "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + strconv.Itoa(len(body)) +
			"\r\nConnection: close\r\n\r\n" + body
	})
	px := apptest.Start(t, upURL, nil)
	url := px.URL + "/v1/chat/completions"
	if first := keyed(t, url, apptest.ClientKey, "whole-json", chatBody, nil); first.status != 200 || string(first.body) != body {
		t.Fatalf("first answer: %d %s", first.status, first.body)
	}
	if again := keyed(t, url, apptest.ClientKey, "whole-json", chatBody, nil); !again.replayed || string(again.body) != body {
		t.Fatalf("retry: replayed=%v %s", again.replayed, again.body)
	}
	if n := calls(); n != 1 {
		t.Fatalf("upstream calls = %d, want 1", n)
	}
}

// TestOnlyFinalAnswersAreStored: the README stores 2xx and deterministic
// 4xx only; a redirect or a 304 is released, and the retry executes.
func TestOnlyFinalAnswersAreStored(t *testing.T) {
	for _, tc := range []struct{ name, head string }{
		{"101", "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: close\r\n\r\n"},
		{"302", "HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"},
		{"304", "HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			upURL, calls := rawUpstream(t, func(int) string { return tc.head })
			px := apptest.Start(t, upURL, nil)
			url := px.URL + "/v1/chat/completions"
			for i := range 2 {
				r := keyed(t, url, apptest.ClientKey, "final-"+tc.name, chatBody, nil)
				if r.replayed {
					t.Fatalf("answer %d: a %s was stored and replayed", i+1, tc.name)
				}
			}
			if n := calls(); n != 2 {
				t.Fatalf("upstream calls = %d, want 2", n)
			}
			if rec := recordFor(t, px, "final-"+tc.name); rec.State != models.StateReleased || rec.ReleaseReason != "upstream_status_"+tc.name {
				t.Fatalf("record: state %s reason %q", rec.State, rec.ReleaseReason)
			}
		})
	}
}

// TestMultipartPartHeadersArePartOfTheRequest: a part header that changes
// what the part means (Content-Transfer-Encoding here) makes another request.
func TestMultipartPartHeadersArePartOfTheRequest(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	send := func(extra map[string]string) (*http.Response, []byte) {
		var buf bytes.Buffer
		mw := multipart.NewWriter(&buf)
		_ = mw.WriteField("purpose", "batch")
		h := textproto.MIMEHeader{"Content-Disposition": {`form-data; name="file"; filename="data.jsonl"`}, "Content-Type": {"application/octet-stream"}}
		for k, v := range extra {
			h.Set(k, v)
		}
		pw, _ := mw.CreatePart(h)
		_, _ = pw.Write([]byte("eyJhIjoxfQ=="))
		_ = mw.Close()
		return do(t, "POST", px.URL+"/v1/files", apptest.ClientKey, &buf, map[string]string{"Content-Type": mw.FormDataContentType(), "Idempotency-Key": "upload-cte"})
	}
	if r, b := send(nil); r.StatusCode != 200 {
		t.Fatalf("first upload: %d %s", r.StatusCode, b)
	}
	if r, _ := send(nil); r.Header.Get("Idempotent-Replayed") != "true" {
		t.Fatal("the same upload with a new boundary is not a replay")
	}
	r, b := send(map[string]string{"Content-Transfer-Encoding": "base64"})
	assertAPIError(t, r, b, 422, "idempotency_key_reused")
	if n := up.Calls(); n != 1 {
		t.Fatalf("upstream calls = %d, want 1", n)
	}
}
