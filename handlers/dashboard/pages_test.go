package dashboard

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// These tests render every dashboard page from fakes, without a database:
// every template executes, and each page shows what its data says. The
// app-level tests in app/dashboard_test.go do the same against real
// PostgreSQL and SQLite.

var testNow = time.Date(2025, 6, 1, 12, 30, 0, 0, time.UTC)

// fakeDB implements every interface the dashboard depends on.
type fakeDB struct {
	mu      sync.Mutex
	pingErr error
	failAll error // returned by every query
	points  []models.TrafficPoint
	totals  models.Totals
	top     []models.TopEntry
	logs    []models.RequestLog
	keys    []models.IdempotencyRecord
	deleted []string
	lastLF  models.LogFilter
}

func (f *fakeDB) Ping(context.Context) error { return f.pingErr }
func (f *fakeDB) Traffic(_ context.Context, from, to time.Time, step time.Duration) ([]models.TrafficPoint, error) {
	return f.points, f.failAll
}
func (f *fakeDB) Totals(context.Context, time.Time, time.Time) (models.Totals, error) {
	return f.totals, f.failAll
}
func (f *fakeDB) TopModels(context.Context, time.Time, time.Time, int) ([]models.TopEntry, error) {
	return f.top, f.failAll
}
func (f *fakeDB) TopClients(context.Context, time.Time, time.Time, int) ([]models.TopEntry, error) {
	return []models.TopEntry{{Name: "alpha", Requests: 7, Tokens: 70}}, f.failAll
}
func (f *fakeDB) ListRequestLogs(ctx context.Context, lf models.LogFilter) (models.LogPage, error) {
	f.mu.Lock()
	f.lastLF = lf
	f.mu.Unlock()
	if lf.Cursor == "bad" {
		return models.LogPage{}, models.ErrInvalidFilter
	}
	if lf.Model == "slow" {
		<-ctx.Done() // a search that walks the whole log
		return models.LogPage{}, ctx.Err()
	}
	return models.LogPage{Logs: f.logs, Next: "123.4"}, f.failAll
}
func (f *fakeDB) RequestLogByID(_ context.Context, id int64) (models.RequestLog, error) {
	for _, l := range f.logs {
		if l.ID == id {
			return l, nil
		}
	}
	return models.RequestLog{}, models.ErrNotFound
}
func (f *fakeDB) ListIdempotency(_ context.Context, filter models.IdempotencyFilter) (models.IdempotencyPage, error) {
	var out []models.IdempotencyRecord
	for _, k := range f.keys {
		if filter.Key == "" || filter.Key == k.IdemKey {
			k.Body = nil
			out = append(out, k)
		}
	}
	return models.IdempotencyPage{Records: out}, f.failAll
}
func (f *fakeDB) IdempotencyByID(_ context.Context, id string) (models.IdempotencyRecord, error) {
	for _, k := range f.keys {
		if k.ID == id {
			return k, nil
		}
	}
	return models.IdempotencyRecord{}, models.ErrNotFound
}
func (f *fakeDB) DeleteIdempotency(_ context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.deleted = append(f.deleted, id)
	return nil
}

func gz(t *testing.T, s string) []byte {
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	_, _ = zw.Write([]byte(s))
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func seededFake(t *testing.T) *fakeDB {
	replayed := testNow.Add(-3 * time.Minute)
	f := &fakeDB{
		totals: models.Totals{Requests: 1234, Errors: 12, ErrorRate: 12.0 / 1234, Replays: 56, Conflicts: 3, Mismatches: 1,
			PromptTokens: 1000, CompletionTokens: 500, TotalTokens: 1500, AvgLatencyMs: 410,
			P50: models.LatencyRange{Known: true, AboveMs: 100, UpToMs: 250}, P95: models.LatencyRange{Known: true, AboveMs: 1000, UpToMs: 2500}},
		top: []models.TopEntry{{Name: "gpt-4o-mini", Requests: 1000, Tokens: 1200}, {Name: "", Requests: 234}},
		logs: []models.RequestLog{
			{ID: 41, CreatedAt: testNow.Add(-time.Minute), Client: "alpha", Method: "POST", Path: "/v1/chat/completions",
				Model: "gpt-4o-mini", Status: 200, Outcome: models.OutcomeProxied, DurationMs: 812, TotalTokens: 18,
				IdempotencyKey: "order-<script>-1", UserAgent: "openai-python/1.0"},
			{ID: 40, CreatedAt: testNow.Add(-2 * time.Minute), Client: "beta", Method: "POST", Path: "/v1/embeddings",
				Status: 502, Outcome: models.OutcomeUpstreamError, Error: "upstream_unreachable"},
		},
		keys: []models.IdempotencyRecord{
			{ID: "aa01", IdemKey: "order-<script>-1", Client: "alpha", Method: "POST", Path: "/v1/chat/completions",
				State: models.StateCompleted, Status: 200, Replayable: true, BodySize: 120, ReplayCount: 2, LastReplayAt: &replayed,
				Headers: `{"Content-Type":"application/json"}`, Body: []byte(`{"id":"chatcmpl-1","msg":"</pre><script>alert(1)</script>"}`),
				CreatedAt: testNow.Add(-time.Minute), ExpiresAt: testNow.Add(24*time.Hour - time.Minute)},
			{ID: "bb02", IdemKey: "stream-key", Client: "beta", Method: "POST", Path: "/v1/responses", Stream: true,
				State: models.StateCompleted, Status: 200, Replayable: true,
				Headers:   `{"Content-Type":"text/event-stream"}`,
				Body:      []byte("event: response.created\ndata: {\"type\":\"response.created\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\"}\n\n"),
				CreatedAt: testNow.Add(-2 * time.Hour), ExpiresAt: testNow.Add(22 * time.Hour)},
			{ID: "cc03", IdemKey: "zipped", Client: "alpha", Method: "POST", Path: "/v1/chat/completions",
				State: models.StateCompleted, Status: 200, Replayable: true,
				Headers: `{"Content-Type":"application/json","Content-Encoding":"gzip"}`, Body: gz(t, `{"zipped":true}`),
				CreatedAt: testNow.Add(-3 * time.Hour), ExpiresAt: testNow.Add(-time.Minute)},
			{ID: "dd04", IdemKey: "running", Client: "alpha", Method: "POST", Path: "/v1/chat/completions",
				State: models.StateInProgress, LockedUntil: testNow.Add(20 * time.Second), Replayable: true,
				CreatedAt: testNow.Add(-5 * time.Second), ExpiresAt: testNow.Add(24 * time.Hour)},
			{ID: "ee05", IdemKey: "huge", Client: "alpha", Method: "POST", Path: "/v1/chat/completions",
				State: models.StateCompleted, Status: 200, Replayable: false, BodySize: 99 << 20,
				CreatedAt: testNow.Add(-4 * time.Hour), ExpiresAt: testNow.Add(20 * time.Hour)},
		},
	}
	for i := range 60 {
		f.points = append(f.points, models.TrafficPoint{Time: testNow.Add(time.Duration(i-60) * time.Minute).Truncate(time.Minute),
			Requests: int64(i), Status2xx: int64(i) - int64(i/10), Status5xx: int64(i / 10), PromptTokens: int64(10 * i), CompletionTokens: int64(5 * i)})
	}
	return f
}

const testPassword = "correct horse battery"

// newTestApp serves the dashboard over f, with its real route table and an error handler like app/errors.go's.
func newTestApp(t *testing.T, f *fakeDB, mod func(*Config)) *fiber.App {
	t.Helper()
	engine, err := NewViews()
	if err != nil {
		t.Fatalf("templates: %v", err)
	}
	app := fiber.New(fiber.Config{Views: engine, ErrorHandler: func(c *fiber.Ctx, err error) error {
		if IsPath(c.Path()) {
			return RenderError(c, err)
		}
		return fiber.DefaultErrorHandler(c, err)
	}})
	cfg := Config{Password: testPassword, Stats: f, Logs: f, Keys: f, DB: f, IdempotencyTTL: 24 * time.Hour,
		Now: func() time.Time { return testNow }}
	if mod != nil {
		mod(&cfg)
	}
	New(cfg).Mount(app)
	return app
}

// client drives app.Test with a cookie jar.
type client struct {
	t   *testing.T
	app *fiber.App
	jar *cookiejar.Jar
}

func newClient(t *testing.T, app *fiber.App) *client {
	jar, _ := cookiejar.New(nil)
	return &client{t: t, app: app, jar: jar}
}

var base, _ = url.Parse("http://example.test/dashboard/")

func (c *client) do(method, target string, form url.Values) (*http.Response, string) {
	c.t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, _ := http.NewRequest(method, "http://example.test"+target, body)
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for _, ck := range c.jar.Cookies(req.URL) {
		req.AddCookie(ck)
	}
	resp, err := c.app.Test(req, -1)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, target, err)
	}
	c.jar.SetCookies(req.URL, resp.Cookies())
	b, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	return resp, string(b)
}

func (c *client) get(target string) (*http.Response, string) { return c.do("GET", target, nil) }

var csrfInput = regexp.MustCompile(`name="_csrf" value="([^"]+)"`)

func csrfToken(t *testing.T, page string) string {
	t.Helper()
	m := csrfInput.FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no CSRF input in page:\n%s", page)
	}
	return m[1]
}

func (c *client) login() {
	c.t.Helper()
	_, page := c.get("/dashboard/login")
	resp, body := c.do("POST", "/dashboard/login", url.Values{"_csrf": {csrfToken(c.t, page)}, "password": {testPassword}})
	if resp.StatusCode != http.StatusSeeOther {
		c.t.Fatalf("login: status %d\n%s", resp.StatusCode, body)
	}
}

func wantStatus(t *testing.T, resp *http.Response, body string, status int) {
	t.Helper()
	if resp.StatusCode != status {
		t.Fatalf("status %d, want %d\n%s", resp.StatusCode, status, body)
	}
}

func wantContains(t *testing.T, body string, parts ...string) {
	t.Helper()
	for _, p := range parts {
		if !strings.Contains(body, p) {
			t.Errorf("page lacks %q", p)
		}
	}
}

func wantAbsent(t *testing.T, body string, parts ...string) {
	t.Helper()
	for _, p := range parts {
		if strings.Contains(body, p) {
			t.Errorf("page contains %q", p)
		}
	}
}

func TestEveryPageRenders(t *testing.T) {
	f := seededFake(t)
	c := newClient(t, newTestApp(t, f, func(cfg *Config) {
		cfg.Open = true
		cfg.Dropped = func() uint64 { return 7 }
	}))
	resp, body := c.get("/dashboard/login")
	wantStatus(t, resp, body, 200)
	wantContains(t, body, `name="password"`, `type="password"`, `name="_csrf"`, `<label for="password">`)
	c.login()

	t.Run("overview", func(t *testing.T) {
		resp, body := c.get("/dashboard?window=1h")
		wantStatus(t, resp, body, 200)
		wantContains(t, body,
			"1,234", "0.97%", "100–250 ms", "1–2.5 s", "410 ms", "1,500", ">56<", "Conflicts",
			`<svg class="chart"`, `role="img"`, "<title id=\"chart-requests-t\">Requests over time by status class</title>",
			`class="s5xx"`, `class="tprompt"`, "gpt-4o-mini", "(none)", "alpha",
			"Open proxy.", "7 request log records were dropped", `aria-current="page">Last hour`)
		wantAbsent(t, body, "Database unreachable", "<table class=\"chart")
	})
	t.Run("overview refresh", func(t *testing.T) {
		_, body := c.get("/dashboard?window=7d&refresh=30")
		wantContains(t, body, `<meta http-equiv="refresh" content="30">`, `aria-current="page">Last 7 days`)
	})
	t.Run("requests", func(t *testing.T) {
		resp, body := c.get("/dashboard/requests?status=5&model=gpt-4o-mini")
		wantStatus(t, resp, body, 200)
		wantContains(t, body, `href="/dashboard/requests/41"`, "/v1/embeddings", ">upstream error<", `class="badge s5xx">502<`,
			`<option value="5" selected>5xx</option>`, `value="gpt-4o-mini"`,
			"order-&lt;script&gt;-1", "Older →", "cursor=123.4", "model=gpt-4o-mini")
		wantAbsent(t, body, "order-<script>")
		if f.lastLF.StatusClass != 5 || f.lastLF.Model != "gpt-4o-mini" {
			t.Errorf("filter passed = %+v", f.lastLF)
		}
	})
	t.Run("requests bad filter", func(t *testing.T) {
		resp, body := c.get("/dashboard/requests?from=yesterday")
		wantStatus(t, resp, body, 400)
		wantContains(t, body, "“From” must be a date")
		resp, body = c.get("/dashboard/requests?cursor=bad")
		wantStatus(t, resp, body, 400)
		wantContains(t, body, "page position")
	})
	t.Run("requests slow search", func(t *testing.T) {
		resp, body := c.get("/dashboard/requests?model=slow&status=5")
		wantStatus(t, resp, body, 200)
		wantContains(t, body, "Add a time range", `value="slow"`)
	})
	t.Run("request", func(t *testing.T) {
		resp, body := c.get("/dashboard/requests/41")
		wantStatus(t, resp, body, 200)
		wantContains(t, body, "Request #41", "812 ms", "openai-python/1.0", "order-&lt;script&gt;-1")
		resp, body = c.get("/dashboard/requests/999")
		wantStatus(t, resp, body, 404)
		wantContains(t, body, "Not Found", "no longer exists")
	})
	t.Run("keys", func(t *testing.T) {
		resp, body := c.get("/dashboard/keys")
		wantStatus(t, resp, body, 200)
		wantContains(t, body, "order-&lt;script&gt;-1", "2025-06-02 12:29:00", "23h 59m", "3m ago",
			"stream-key", "22h 00m", "expired", "in flight", "too large to store", "each completed key is replayed for 24h")
		if t.Failed() {
			t.Log(body)
		}
	})
	t.Run("key json", func(t *testing.T) {
		resp, body := c.get("/dashboard/keys/aa01")
		wantStatus(t, resp, body, 200)
		wantContains(t, body, "&#34;id&#34;: &#34;chatcmpl-1&#34;", "&lt;/pre&gt;&lt;script&gt;", "23h 59m left", `action="/dashboard/keys/aa01/delete"`)
		wantAbsent(t, body, "<script>alert")
	})
	t.Run("key sse", func(t *testing.T) {
		_, body := c.get("/dashboard/keys/bb02")
		wantContains(t, body, "2 events", "response.created", "response.completed", `<ol class="events">`)
	})
	t.Run("key gzip", func(t *testing.T) {
		_, body := c.get("/dashboard/keys/cc03")
		wantContains(t, body, "&#34;zipped&#34;: true", "Shown decompressed", "expired")
	})
	t.Run("key not stored", func(t *testing.T) {
		_, body := c.get("/dashboard/keys/ee05")
		wantContains(t, body, "IDEMPOTENCY_MAX_BODY")
	})
	t.Run("key missing", func(t *testing.T) {
		resp, body := c.get("/dashboard/keys/ff99")
		wantStatus(t, resp, body, 404)
	})
	t.Run("delete asks, then deletes", func(t *testing.T) {
		_, page := c.get("/dashboard/keys/dd04")
		resp, body := c.do("POST", "/dashboard/keys/dd04/delete", url.Values{"_csrf": {csrfToken(t, page)}})
		wantStatus(t, resp, body, 200)
		wantContains(t, body, "Delete this key?", "in flight right now", `name="confirm" value="yes"`)
		if len(f.deleted) != 0 {
			t.Fatal("deleted without confirmation")
		}
		resp, body = c.do("POST", "/dashboard/keys/dd04/delete", url.Values{"_csrf": {csrfToken(t, body)}, "confirm": {"yes"}})
		wantStatus(t, resp, body, 303)
		if loc := resp.Header.Get("Location"); loc != "/dashboard/keys?deleted=1" {
			t.Fatalf("Location %q", loc)
		}
		if len(f.deleted) != 1 || f.deleted[0] != "dd04" {
			t.Fatalf("deleted = %v", f.deleted)
		}
		_, body = c.get("/dashboard/keys?deleted=1")
		wantContains(t, body, "The key was expired")
	})
	t.Run("unknown page", func(t *testing.T) {
		resp, body := c.get("/dashboard/nope")
		wantStatus(t, resp, body, 404)
		wantContains(t, body, "<!doctype html>", "There is no such page")
	})
	t.Run("headers", func(t *testing.T) {
		resp, _ := c.get("/dashboard/keys")
		for name, want := range map[string]string{
			"Cache-Control": "no-store", "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
		} {
			if got := resp.Header.Get(name); got != want {
				t.Errorf("%s = %q, want %q", name, got, want)
			}
		}
		if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'none'") || !strings.Contains(csp, "frame-ancestors 'none'") {
			t.Errorf("CSP = %q", csp)
		}
	})
	t.Run("logout", func(t *testing.T) {
		_, page := c.get("/dashboard/keys")
		resp, body := c.do("POST", "/dashboard/logout", url.Values{"_csrf": {csrfToken(t, page)}})
		wantStatus(t, resp, body, 303)
		resp, body = c.get("/dashboard/keys")
		wantStatus(t, resp, body, 303)
		_, body = c.get("/dashboard/login?bye=1")
		wantContains(t, body, "You are signed out.")
	})
}

func TestOverviewWithDatabaseDown(t *testing.T) {
	f := seededFake(t)
	f.pingErr = errors.New("dial tcp: connection refused")
	c := newClient(t, newTestApp(t, f, nil))
	c.login()
	resp, body := c.get("/dashboard")
	wantStatus(t, resp, body, 200)
	wantContains(t, body, "Database unreachable", `<svg class="chart"`, "No requests in this window")
	wantAbsent(t, body, "connection refused", "Open proxy.", "dropped")

	f.pingErr, f.failAll = nil, errors.New("relation request_rollups: SECRET SQL")
	_, body = c.get("/dashboard")
	wantContains(t, body, "Some numbers could not be loaded")
	wantAbsent(t, body, "SECRET SQL")

	resp, body = c.get("/dashboard/keys")
	wantStatus(t, resp, body, 500)
	wantContains(t, body, "Something went wrong")
	wantAbsent(t, body, "SECRET SQL")
}

func TestSecureCookiesOnlyOverTrustedHTTPS(t *testing.T) {
	for _, tc := range []struct {
		name    string
		trust   bool
		proto   string
		secure  bool
		sameSit string
	}{
		{"plain http", false, "", false, "Lax"},
		{"forged X-Forwarded-Proto", false, "https", false, "Lax"},
		{"trusted proxy says https", true, "https", true, "Lax"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := seededFake(t)
			app := newTestApp(t, f, func(cfg *Config) { cfg.TrustForwardedProto = tc.trust })
			c := newClient(t, app)
			_, page := c.get("/dashboard/login")
			form := url.Values{"_csrf": {csrfToken(t, page)}, "password": {testPassword}}
			req, _ := http.NewRequest("POST", "http://example.test/dashboard/login", strings.NewReader(form.Encode()))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			req.Header.Set("Referer", "https://example.test/dashboard/login")
			if tc.proto != "" {
				req.Header.Set("X-Forwarded-Proto", tc.proto)
			}
			for _, ck := range c.jar.Cookies(req.URL) {
				req.AddCookie(ck)
			}
			resp, err := app.Test(req, -1)
			if err != nil {
				t.Fatal(err)
			}
			wantStatus(t, resp, "", 303)
			var found bool
			for _, raw := range resp.Header.Values("Set-Cookie") {
				if !strings.HasPrefix(raw, sessionCookie+"=") {
					continue
				}
				found = true
				lower := strings.ToLower(raw)
				if strings.Contains(lower, "; secure") != tc.secure {
					t.Errorf("Secure = %v, want %v: %s", !tc.secure, tc.secure, raw)
				}
				if !strings.Contains(lower, "; httponly") || !strings.Contains(lower, "samesite="+strings.ToLower(tc.sameSit)) {
					t.Errorf("cookie lacks HttpOnly or SameSite: %s", raw)
				}
			}
			if !found {
				t.Fatal("no session cookie set")
			}
		})
	}
}

func TestSafeNext(t *testing.T) {
	for in, want := range map[string]string{
		"":                              "/dashboard",
		"/dashboard/keys?key=a":         "/dashboard/keys?key=a",
		"/dashboard":                    "/dashboard",
		"https://evil.example/":         "/dashboard",
		"//evil.example/dashboard":      "/dashboard",
		"/\\evil.example":               "/dashboard",
		"/v1/models":                    "/dashboard",
		"/dashboard/login":              "/dashboard",
		"/dashboardx":                   "/dashboard",
		"javascript:alert(1)":           "/dashboard",
		"/dashboard/requests/1\r\nX: y": "/dashboard",
	} {
		if got := safeNext(in); got != want {
			t.Errorf("safeNext(%q) = %q, want %q", in, got, want)
		}
	}
}

// A latency shows its histogram bucket, never a figure finer than it.
func TestFormatLatency(t *testing.T) {
	for _, tc := range []struct {
		r    models.LatencyRange
		want string
	}{
		{models.LatencyRange{}, "—"},
		{models.LatencyRange{Known: true, AboveMs: -1, UpToMs: 0}, "< 1 ms"},
		{models.LatencyRange{Known: true, AboveMs: 0, UpToMs: 1}, "1 ms"},
		{models.LatencyRange{Known: true, AboveMs: 2, UpToMs: 5}, "2–5 ms"},
		{models.LatencyRange{Known: true, AboveMs: -1, UpToMs: 50}, "≤ 50 ms"},
		{models.LatencyRange{Known: true, AboveMs: 500, UpToMs: 1000}, "500 ms–1 s"},
		{models.LatencyRange{Known: true, AboveMs: 1000, UpToMs: 2500}, "1–2.5 s"},
		{models.LatencyRange{Known: true, AboveMs: 120000, UpToMs: -1}, "> 120 s"},
	} {
		if got := formatLatency(tc.r); got != tc.want {
			t.Errorf("formatLatency(%+v) = %q, want %q", tc.r, got, tc.want)
		}
	}
	if got := formatMs(0); got != "< 1 ms" {
		t.Errorf("formatMs(0) = %q", got)
	}
}

func TestFormatLeft(t *testing.T) {
	for d, want := range map[time.Duration]string{
		24*time.Hour - time.Minute - 30*time.Second: "23h 58m",
		24*time.Hour - 30*time.Second:               "23h 59m",
		90 * time.Minute:                            "1h 30m",
		4*time.Minute + 12*time.Second:              "4m 12s",
		42 * time.Second:                            "42s",
		0:                                           "expired",
		-time.Hour:                                  "expired",
		72 * time.Hour:                              "3d 00h",
	} {
		if got := formatLeft(d); got != want {
			t.Errorf("formatLeft(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestChartSVG(t *testing.T) {
	c := stackedChart{ID: "x", Title: `A & "B"`, Summary: "<sum>", Unit: "requests",
		Labels: []string{"10:00", "10:01", "10:02"}, Axis: []string{"10:00", "", ""},
		Series: []chartSeries{{Name: "2xx", Class: "s2xx", Values: []float64{3, 0, 5}}, {Name: "5xx", Class: "s5xx", Values: []float64{1, 0, 0}}}}
	svg := string(c.SVG())
	wantContains(t, svg, `<svg class="chart"`, `aria-labelledby="x-t x-d"`, `<title id="x-t">A &amp; &#34;B&#34;</title>`,
		`<desc id="x-d">&lt;sum&gt;</desc>`, "10:00 — 4 requests: 2xx 3, 5xx 1", "10:02 — 5 requests: 2xx 5", `class="s5xx"`)
	if n := strings.Count(svg, `<g class="bar">`); n != 3 {
		t.Errorf("%d bars, want 3", n)
	}
	// The axis top is a round number at or above the peak.
	wantContains(t, svg, `>6</text>`, `>0</text>`)
	empty := stackedChart{ID: "e", Unit: "tokens", Labels: []string{"a"}, Axis: []string{"a"}, Series: []chartSeries{{Name: "p", Class: "p", Values: []float64{0}}}}
	wantContains(t, string(empty.SVG()), "No tokens in this window")
}

func TestNiceScale(t *testing.T) {
	for _, tc := range []struct{ peak, top, step float64 }{
		{0, 4, 1}, {1, 1, 1}, {3, 3, 1}, {7, 8, 2}, {10, 10, 2.5}, {97, 100, 25}, {1234, 1500, 500}, {9_000_000, 10_000_000, 2_500_000},
	} {
		top, step := niceScale(tc.peak, 1)
		if top != tc.top || step != tc.step {
			t.Errorf("niceScale(%v, 1) = %v, %v; want %v, %v", tc.peak, top, step, tc.top, tc.step)
		}
	}
	// Money: a cent at least, and finer than 1 below a dollar.
	for _, tc := range []struct{ peak, top, step float64 }{
		{0, 0.04, 0.01}, {0.000006, 0.01, 0.01}, {0.07, 0.08, 0.02}, {0.1, 0.1, 0.025}, {12.5, 15, 5},
	} {
		top, step := niceScale(tc.peak, 0.01)
		if math.Abs(top-tc.top) > 1e-9 || math.Abs(step-tc.step) > 1e-9 {
			t.Errorf("niceScale(%v, 0.01) = %v, %v; want %v, %v", tc.peak, top, step, tc.top, tc.step)
		}
	}
}

// A spend chart of sub-cent amounts: a cent axis, and tooltips that tell
// the exact spend instead of rounding it to 0.
func TestSpendChartShowsSmallAmounts(t *testing.T) {
	c := stackedChart{ID: "s", Unit: "USD", Money: true, Labels: []string{"09:00", "10:00"}, Axis: []string{"09:00", "10:00"},
		Series: []chartSeries{{Name: "spend", Class: "tprompt", Values: []float64{0.000006, 0.025}}}}
	svg := string(c.SVG())
	wantContains(t, svg, "09:00 — $0.000006: spend $0.000006", "10:00 — $0.03:", `>$0.01</text>`, `>$0.03</text>`, `>$0</text>`)
	if strings.Contains(svg, "No USD") {
		t.Error("a chart with spend says it has none")
	}
}

func TestParseSSE(t *testing.T) {
	events, cut := parseSSE([]byte(": comment\r\n\r\ndata: {\"a\":1}\r\n\r\nevent: done\nid: 7\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n"))
	if cut || len(events) != 3 {
		t.Fatalf("events = %+v", events)
	}
	if events[0].Data != "{\n  \"a\": 1\n}" || events[1].Event != "done" || events[1].ID != "7" || events[1].Data != "line1\nline2" || events[2].Data != "[DONE]" {
		t.Errorf("events = %+v", events)
	}
}
