package app_test

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fasthttp/websocket"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// realtimeCost is one fake response.done at gpt-4o-realtime-preview's
// rates ($5 in, $2.50 cached, $20 out per 1M): 6 input, 4 cached, 20 output.
const realtimeCost int64 = 6*5 + 4*2.5 + 20*20

// wsSession opens a Realtime session with key, runs n responses and
// closes it; a refused upgrade returns its status and error code.
func wsSession(t *testing.T, in *apptest.Instance, key string, n int) (int, string, http.Header) {
	t.Helper()
	c, resp, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(in.URL, "http")+"/v1/realtime?model=gpt-4o-realtime-preview",
		http.Header{"Authorization": {"Bearer " + key}})
	if err != nil {
		if resp == nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		var e struct{ Error struct{ Code string } }
		_ = json.Unmarshal(b, &e)
		return resp.StatusCode, e.Error.Code, resp.Header
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for range n {
		if err := c.WriteMessage(websocket.TextMessage, []byte(`{"type":"response.create"}`)); err != nil {
			t.Fatal(err)
		}
		for {
			_, msg, err := c.ReadMessage()
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(msg), `"response.done"`) {
				break
			}
		}
	}
	_ = c.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
	for {
		if _, _, err := c.ReadMessage(); err != nil {
			break
		}
	}
	return resp.StatusCode, "", resp.Header
}

func TestWebSocketSessionsCountAgainstKeyLimits(t *testing.T) {
	up := apptest.NewWSUpstream(t)
	px := apptest.Start(t, up.URL+"/v1", map[string]string{"ADMIN_API_TOKEN": adminToken, "DATA_DIR": t.TempDir(), "BUDGET_RESERVE_TOKENS": "10"})
	upstreamSessions := func() int { return len(up.Sessions()) }

	// RPM: a session start is a request; the second is refused before
	// the upgrade, in OpenAI's shape, and never reaches upstream.
	k := createKey(t, px, `{"name":"ws-rpm","rpm":1}`)
	apptest.Eventually(t, 5*time.Second, func() bool { return call(t, px, k.Key, `{"model":"x"}`).status != 401 }, "key unknown")
	// That call took the one request of the minute: the session is refused.
	if status, code, h := wsSession(t, px, k.Key, 1); status != 429 || code != "rate_limit_exceeded" || h.Get("Retry-After") == "" {
		t.Fatalf("session over rpm: %d %q Retry-After %q", status, code, h.Get("Retry-After"))
	}
	if n := upstreamSessions(); n != 0 {
		t.Fatalf("a refused session reached upstream (%d sessions)", n)
	}

	// Budget: each response is priced and spent as it is reported; once
	// spent, new sessions are refused.
	b := createKey(t, px, `{"name":"ws-budget","budget_usd":0.001,"budget_period":"day"}`)
	apptest.Eventually(t, 5*time.Second, func() bool {
		status, _, _ := wsSession(t, px, b.Key, 2)
		return status == 101
	}, "budgeted session not admitted")
	var row struct{ CostMicros, TotalTokens int64 }
	apptest.Eventually(t, 5*time.Second, func() bool {
		px.App.Store.DB().Raw("SELECT cost_micros, total_tokens FROM request_logs WHERE client = 'ws-budget' AND status = 101").Scan(&row)
		return row.TotalTokens > 0
	}, "no row for the session")
	if row.CostMicros != 2*realtimeCost {
		t.Fatalf("session cost %d µ$, want %d", row.CostMicros, 2*realtimeCost)
	}
	var budget struct{ SpentMicros, ReservedMicros int64 }
	apptest.Eventually(t, 5*time.Second, func() bool {
		px.App.Store.DB().Raw("SELECT spent_micros, reserved_micros FROM client_key_budgets WHERE key_id = ?", b.ID).Scan(&budget)
		return budget.SpentMicros == 2*realtimeCost && budget.ReservedMicros == 0
	}, "budget: %+v, want %d spent and nothing reserved", budget, 2*realtimeCost)
	// $0.001 = 1000 µ$: 880 spent leaves less than a session's estimate
	// (10 output tokens at $20 per 1M: 200 µ$).
	before := upstreamSessions()
	if status, code, _ := wsSession(t, px, b.Key, 1); status != 429 || code != "budget_exceeded" {
		t.Fatalf("session over budget: %d %q", status, code)
	}
	if n := upstreamSessions(); n != before {
		t.Fatal("a session over budget reached upstream")
	}
}

// A session whose key's budget runs out mid-session is cut after the
// response that spent it: the client gets that response, then an error
// event (budget_exceeded) and close 1008; nothing more is spent, and the
// other replica refuses the next session.
func TestWebSocketSessionOverBudgetIsCut(t *testing.T) {
	wsUpstream := func(t *testing.T) (string, *apptest.Upstream) { return apptest.NewWSUpstream(t).URL + "/v1", nil }
	eachDatabaseOn(t, wsUpstream, map[string]string{"BUDGET_RESERVE_TOKENS": "10"}, func(t *testing.T, p pair) {
		// $0.001: a session's estimate is 200 µ$ (10 output tokens at $20
		// per 1M), each response costs 440 µ$. The session reserves 200;
		// each response spends it and reserves 200 more, until after the
		// second (880 spent) no 200 is left.
		b := createKey(t, p.a, `{"name":"ws-cut","budget_usd":0.001,"budget_period":"day"}`)
		for _, in := range []*apptest.Instance{p.a, p.b} {
			apptest.Eventually(t, 5*time.Second, func() bool { return call(t, in, b.Key, `{"model":"x"}`).status != 401 }, "key unknown")
		}
		done, errCode, closeCode := realtimeUntilClosed(t, p.a, b.Key, 5)
		if done != 2 || errCode != "budget_exceeded" || closeCode != websocket.ClosePolicyViolation {
			t.Fatalf("%d responses, error event %q, close %d; want 2, budget_exceeded, 1008", done, errCode, closeCode)
		}
		var budget struct{ SpentMicros, ReservedMicros int64 }
		apptest.Eventually(t, 5*time.Second, func() bool {
			p.a.App.Store.DB().Raw("SELECT spent_micros, reserved_micros FROM client_key_budgets WHERE key_id = ?", b.ID).Scan(&budget)
			return budget.SpentMicros == 2*realtimeCost && budget.ReservedMicros == 0
		}, "budget: %+v, want %d spent and nothing reserved", budget, 2*realtimeCost)
		if status, code, _ := wsSession(t, p.b, b.Key, 1); status != 429 || code != "budget_exceeded" {
			t.Fatalf("the other replica's next session: %d %q", status, code)
		}
	})
}

// realtimeUntilClosed asks for up to n responses in one session and reads
// until the proxy closes it: the responses done, the code of an error
// event and the close code.
func realtimeUntilClosed(t *testing.T, in *apptest.Instance, key string, n int) (done int, errCode string, closeCode int) {
	t.Helper()
	c, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(in.URL, "http")+"/v1/realtime?model=gpt-4o-realtime-preview",
		http.Header{"Authorization": {"Bearer " + key}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var closeErr *websocket.CloseError
	read := func() (string, string) {
		_, msg, err := c.ReadMessage()
		if err != nil {
			if !errors.As(err, &closeErr) {
				t.Fatalf("after %d responses: %v", done, err)
			}
			return "", ""
		}
		var ev struct {
			Type  string
			Error struct{ Code string }
		}
		_ = json.Unmarshal(msg, &ev)
		return ev.Type, ev.Error.Code
	}
	for done < n && closeErr == nil {
		if c.WriteMessage(websocket.TextMessage, []byte(`{"type":"response.create"}`)) != nil {
			break // cut while asking
		}
		for closeErr == nil {
			typ, code := read()
			if typ == "error" {
				errCode = code
			}
			if typ == "response.done" {
				done++
				break
			}
		}
	}
	for closeErr == nil {
		if typ, code := read(); typ == "error" {
			errCode = code
		}
	}
	return done, errCode, closeErr.Code
}
