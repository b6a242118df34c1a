//go:build linux

package soak

// TestJoinFigures measures joining a running keyed stream (issue 13), in
// process, on two instances sharing one PostgreSQL:
//   - the attempt's own client's event gaps with 0, 1 and 50 joiners (half
//     on each instance): joiners must not slow it;
//   - join latency, ask to first byte, on the holder's instance and the
//     other one;
//   - database statements per streamed second, with and without joiners.
//
//	SOAK=1 go test ./soak/ -run JoinFigures -v

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gorm.io/gorm"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

const joinEvents, joinGap = 40, 50 * time.Millisecond

// countStatements counts every statement the instance's store runs.
func countStatements(t *testing.T, db *gorm.DB) *atomic.Int64 {
	var n atomic.Int64
	count := func(*gorm.DB) { n.Add(1) }
	cb := db.Callback()
	for _, err := range []error{
		cb.Create().After("gorm:create").Register("soak:count", count),
		cb.Query().After("gorm:query").Register("soak:count", count),
		cb.Update().After("gorm:update").Register("soak:count", count),
		cb.Delete().After("gorm:delete").Register("soak:count", count),
		cb.Row().After("gorm:row").Register("soak:count", count),
		cb.Raw().After("gorm:raw").Register("soak:count", count),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	return &n
}

func TestJoinFigures(t *testing.T) {
	requireSoak(t)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range joinEvents {
			fmt.Fprintf(w, "data: {\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"e%d\"}}]}\n\n", i)
			w.(http.Flusher).Flush()
			time.Sleep(joinGap) // the upstream's pace, not synchronisation
		}
		fmt.Fprint(w, "data: [DONE]\n\n")
	}))
	defer up.Close()
	env := map[string]string{"DATABASE_URL": testdb.PostgresURL(t), "LOG_LEVEL": "warn"}
	one, two := apptest.Start(t, up.URL, env), apptest.Start(t, up.URL, env)
	stmts := []*atomic.Int64{countStatements(t, one.App.Store.DB()), countStatements(t, two.App.Store.DB())}
	const body = `{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}`
	send := func(url, key string) (*http.Response, time.Time) {
		req, _ := http.NewRequest("POST", url+"/v1/chat/completions", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", key)
		asked := time.Now()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp, asked
	}
	// eventTimes reads a stream's events, stamping each.
	eventTimes := func(resp *http.Response) []time.Time {
		defer resp.Body.Close()
		var at []time.Time
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), "data: ") {
				at = append(at, time.Now())
			}
		}
		return at
	}
	gaps := func(at []time.Time) (p50, max time.Duration) {
		var d []time.Duration
		for i := 1; i < len(at); i++ {
			d = append(d, at[i].Sub(at[i-1]))
		}
		slices.Sort(d)
		return d[len(d)/2], d[len(d)-1]
	}
	total := func() int64 { return stmts[0].Load() + stmts[1].Load() }

	t.Logf("%-10s %12s %12s %14s %16s %16s", "joiners", "gap p50", "gap max", "statements/s", "join same p50", "join other p50")
	for run, joiners := range []int{0, 1, 50} {
		key := fmt.Sprintf("figures-%d", run)
		before := total()
		holder, asked := send(one.URL, key)
		var wg sync.WaitGroup
		var mu sync.Mutex
		var same, other []time.Duration
		if joiners > 0 {
			// Join once the stream is under way (its first event read).
			br := bufio.NewReader(holder.Body)
			if _, err := br.ReadString('\n'); err != nil {
				t.Fatal(err)
			}
			holder.Body = struct {
				io.Reader
				io.Closer
			}{br, holder.Body}
			for i := range joiners {
				wg.Add(1)
				go func() {
					defer wg.Done()
					in := two
					if joiners > 1 && i%2 == 0 {
						in = one
					}
					resp, asked := send(in.URL, key)
					one := make([]byte, 1)
					_, _ = io.ReadFull(resp.Body, one)
					d := time.Since(asked)
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					mu.Lock()
					if in == two {
						other = append(other, d)
					} else {
						same = append(same, d)
					}
					mu.Unlock()
				}()
			}
		}
		at := eventTimes(holder)
		took := time.Since(asked)
		wg.Wait()
		p50, mx := gaps(at)
		median := func(d []time.Duration) string {
			if len(d) == 0 {
				return "-"
			}
			slices.Sort(d)
			return d[len(d)/2].Round(10 * time.Microsecond).String()
		}
		perSecond := float64(total()-before) / took.Seconds()
		t.Logf("%-10d %12s %12s %14.1f %16s %16s", joiners, p50.Round(10*time.Microsecond), mx.Round(10*time.Microsecond), perSecond, median(same), median(other))
	}
}
