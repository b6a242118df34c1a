package app_test

import (
	"fmt"
	"html"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// The dashboard against the whole proxy, in-process, over real HTTP, on
// SQLite and PostgreSQL: rendered HTML checked for the seeded rows,
// numbers, expirations, filters and pages, plus the security properties.

const adminPassword = "dashboard-Pa55word!"

// browser is an HTTP client with a cookie jar that does not follow
// redirects, so tests see every 303, and that checks no response ever
// contains a key.
type browser struct {
	t    *testing.T
	base string
	http *http.Client
}

func newBrowser(t *testing.T, px *apptest.Instance) *browser {
	jar, _ := cookiejar.New(nil)
	return &browser{t: t, base: px.URL, http: &http.Client{
		Jar:           jar,
		Timeout:       30 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
}

func (b *browser) do(method, path string, form url.Values, header map[string]string) (*http.Response, string) {
	b.t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequest(method, b.base+path, body)
	if err != nil {
		b.t.Fatal(err)
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := b.http.Do(req)
	if err != nil {
		b.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		b.t.Fatal(err)
	}
	var hdr strings.Builder
	_ = resp.Header.Write(&hdr)
	assertNoKeys(b.t, method+" "+path, string(raw), hdr.String())
	return resp, string(raw)
}

func (b *browser) get(path string) (*http.Response, string) { return b.do("GET", path, nil, nil) }

func (b *browser) post(path string, form url.Values) (*http.Response, string) {
	return b.do("POST", path, form, nil)
}

// page GETs path and fails unless it answers 200.
func (b *browser) page(path string) string {
	b.t.Helper()
	resp, body := b.get(path)
	if resp.StatusCode != http.StatusOK {
		b.t.Fatalf("GET %s: status %d\n%s", path, resp.StatusCode, body)
	}
	return body
}

func (b *browser) login() {
	b.t.Helper()
	resp, body := b.post("/dashboard/login", url.Values{"_csrf": {csrfOf(b.t, b.page("/dashboard/login"))}, "password": {adminPassword}})
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/dashboard" {
		b.t.Fatalf("login: %d %s\n%s", resp.StatusCode, resp.Header.Get("Location"), body)
	}
}

func assertNoKeys(t *testing.T, where string, texts ...string) {
	t.Helper()
	for _, s := range texts {
		for _, k := range []string{apptest.UpstreamKey, apptest.ClientKey, apptest.ClientKey2, adminPassword} {
			if strings.Contains(s, k) {
				t.Fatalf("%s: response contains a secret", where)
			}
		}
	}
}

var (
	csrfRe       = regexp.MustCompile(`name="_csrf" value="([^"]+)"`)
	requestRowRe = regexp.MustCompile(`href="/dashboard/requests/(\d+)"`)
	keyRowRe     = regexp.MustCompile(`href="/dashboard/keys/([0-9a-f]+)"`)
	olderRe      = regexp.MustCompile(`rel="next" href="([^"]+)">Older`)
)

func csrfOf(t *testing.T, page string) string {
	t.Helper()
	m := csrfRe.FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no _csrf input on the page:\n%s", page)
	}
	return m[1]
}

func matches(re *regexp.Regexp, page string) []string {
	var out []string
	for _, m := range re.FindAllStringSubmatch(page, -1) {
		out = append(out, m[1])
	}
	return out
}

func older(page string) string {
	m := olderRe.FindStringSubmatch(page)
	if m == nil {
		return ""
	}
	return html.UnescapeString(m[1])
}

func contains(t *testing.T, where, page string, parts ...string) {
	t.Helper()
	for _, p := range parts {
		if !strings.Contains(page, p) {
			t.Errorf("%s lacks %q", where, p)
		}
	}
}

// seedLogs records logs through the proxy's own writer, so the roll-ups
// behind the overview are written exactly as in production, and waits for
// the background writer to commit them.
func seedLogs(t *testing.T, px *apptest.Instance, logs []models.RequestLog) {
	t.Helper()
	before := px.App.Logs.Written()
	for _, l := range logs {
		if !px.App.Logs.Record(l) {
			t.Fatal("log record dropped")
		}
	}
	apptest.Eventually(t, 15*time.Second, func() bool { return px.App.Logs.Written() >= before+uint64(len(logs)) },
		"not all %d log records written", len(logs))
}

// seededLogs are 120 requests over the last 50 minutes: every 6th a 5xx,
// every 5th a 4xx, two models, two clients, every 10th keyed.
func seededLogs(now time.Time) []models.RequestLog {
	logs := make([]models.RequestLog, 120)
	for i := range logs {
		l := models.RequestLog{
			CreatedAt: now.Add(-time.Duration(i) * 25 * time.Second), Client: []string{"alpha", "beta"}[i%2],
			Method: "POST", Path: "/v1/chat/completions", Model: []string{"gpt-4o-mini", "gpt-4.1"}[i%3/2],
			Status: 200, Outcome: models.OutcomeProxied, DurationMs: int64(100 + i), PromptTokens: 10, CompletionTokens: 5, TotalTokens: 15,
		}
		switch {
		case i%6 == 0:
			l.Status, l.Outcome = 502, models.OutcomeUpstreamError
		case i%5 == 0:
			l.Status, l.Outcome = 409, models.OutcomeIdempotencyConflict
		}
		if i%10 == 0 {
			l.IdempotencyKey = fmt.Sprintf("seed-key-%d", i)
		}
		if i%4 == 3 {
			l.Path, l.Model = "/v1/embeddings", "text-embedding-3-small"
		}
		logs[i] = l
	}
	return logs
}

func TestDashboardPagesShowSeededData(t *testing.T) {
	apptest.EachDB(t, adminEnv, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		now := time.Now().UTC()
		logs := seededLogs(now)
		seedLogs(t, px, logs)
		b := newBrowser(t, px)
		b.login()

		t.Run("overview numbers", func(t *testing.T) {
			var want5xx, want409 int
			for _, l := range logs {
				want5xx += btoi(l.Status >= 500)
				want409 += btoi(l.Status == 409)
			}
			page := b.page("/dashboard?window=1h")
			contains(t, "overview", page,
				`<dd class="big">120</dd>`,                      // requests
				fmt.Sprintf(`%d errors (5xx`, want5xx),          // 20
				fmt.Sprintf(`<dd class="big">%d</dd>`, want409), // conflicts
				"1,200 prompt · 600 completion", "<dd class=\"big\">1,800</dd>",
				`<svg class="chart"`, `class="s5xx"`, `class="s4xx"`, `class="s2xx"`,
				">gpt-4o-mini<", ">text-embedding-3-small<", ">alpha<", ">beta<")
			if strings.Contains(page, "Open proxy") || strings.Contains(page, "Database unreachable") {
				t.Error("overview shows a warning it should not")
			}
			// Every window renders.
			for _, w := range []string{"24h", "7d"} {
				contains(t, "overview "+w, b.page("/dashboard?window="+w), `<dd class="big">120</dd>`)
			}
		})

		t.Run("request log pages by keyset", func(t *testing.T) {
			var seen []string
			path := "/dashboard/requests"
			for pages := 1; ; pages++ {
				page := b.page(path)
				rows := matches(requestRowRe, page)
				if pages < 3 && len(rows) != 50 {
					t.Fatalf("page %d has %d rows, want 50", pages, len(rows))
				}
				seen = append(seen, rows...)
				if path = older(page); path == "" {
					if pages != 3 {
						t.Fatalf("%d pages, want 3", pages)
					}
					break
				}
				if !strings.Contains(path, "cursor=") || strings.Contains(path, "offset") {
					t.Fatalf("older link %q is not a cursor", path)
				}
			}
			if len(seen) != 120 {
				t.Fatalf("%d rows over all pages, want 120", len(seen))
			}
			sorted := slices.Clone(seen)
			slices.Sort(sorted)
			if len(slices.Compact(sorted)) != 120 {
				t.Fatal("a row repeats across pages")
			}
		})

		t.Run("request filters", func(t *testing.T) {
			count := func(match func(models.RequestLog) bool) int {
				n := 0
				for _, l := range logs {
					n += btoi(match(l))
				}
				return n
			}
			from := now.Add(-10 * time.Minute).Truncate(time.Minute)
			for _, tc := range []struct {
				query string
				match func(models.RequestLog) bool
			}{
				{"status=5", func(l models.RequestLog) bool { return l.Status/100 == 5 }},
				{"status=4", func(l models.RequestLog) bool { return l.Status/100 == 4 }},
				{"model=gpt-4.1", func(l models.RequestLog) bool { return l.Model == "gpt-4.1" }},
				{"path=/v1/embeddings", func(l models.RequestLog) bool { return l.Path == "/v1/embeddings" }},
				{"client=beta&status=2", func(l models.RequestLog) bool { return l.Client == "beta" && l.Status/100 == 2 }},
				{"key=seed-key-30", func(l models.RequestLog) bool { return l.IdempotencyKey == "seed-key-30" }},
				{"outcome=upstream_error", func(l models.RequestLog) bool { return l.Outcome == models.OutcomeUpstreamError }},
				{"from=" + from.Format("2006-01-02T15:04"), func(l models.RequestLog) bool { return !l.CreatedAt.Before(from) }},
			} {
				page := b.page("/dashboard/requests?" + tc.query)
				if got, want := len(matches(requestRowRe, page)), min(50, count(tc.match)); got != want || want == 0 {
					t.Errorf("%s: %d rows, want %d", tc.query, got, want)
				}
			}
			page := b.page("/dashboard/requests?status=5")
			if strings.Contains(page, `class="badge s2xx"`) || strings.Contains(page, `class="badge s4xx"`) {
				t.Error("5xx filter shows other statuses")
			}
			resp, body := b.get("/dashboard/requests?status=7")
			if resp.StatusCode != 400 || !strings.Contains(body, "Status must be") {
				t.Errorf("bad status filter: %d", resp.StatusCode)
			}
		})

		t.Run("request detail", func(t *testing.T) {
			id := matches(requestRowRe, b.page("/dashboard/requests?key=seed-key-30"))[0]
			page := b.page("/dashboard/requests/" + id)
			contains(t, "request detail", page, "seed-key-30", "/v1/chat/completions", "Request #"+id)
			if resp, _ := b.get("/dashboard/requests/999999999"); resp.StatusCode != 404 {
				t.Errorf("missing request: %d", resp.StatusCode)
			}
		})
	})
}

// seedKeys stores n completed records directly, newest first by index,
// expiring 23h59m30s after now (so "23h 59m" left while the test runs).
func seedKeyRecords(t *testing.T, px *apptest.Instance, now time.Time, n int) []models.IdempotencyRecord {
	t.Helper()
	recs := make([]models.IdempotencyRecord, n)
	for i := range recs {
		at := now.Add(-time.Duration(i) * time.Second).Truncate(time.Microsecond)
		recs[i] = models.IdempotencyRecord{
			ID: fmt.Sprintf("%064x", 1000+i), Client: "alpha", Method: "POST", Path: "/v1/chat/completions",
			IdemKey: fmt.Sprintf("seeded-%03d", i), Fingerprint: "f", State: models.StateCompleted, LockedUntil: at,
			Status: 200, Headers: `{"Content-Type":"application/json"}`, Body: []byte(fmt.Sprintf(`{"n":%d,"note":"<b>x</b>"}`, i)),
			BodySize: 24, Replayable: true, ReplayCount: i % 4, CreatedAt: at, UpdatedAt: at,
			ExpiresAt: now.Add(24*time.Hour - 30*time.Second).Truncate(time.Second),
		}
	}
	if err := px.App.Store.DB().CreateInBatches(recs, 100).Error; err != nil {
		t.Fatal(err)
	}
	return recs
}

func TestDashboardKeys(t *testing.T) {
	apptest.EachDB(t, adminEnv, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		now := time.Now().UTC()
		recs := seedKeyRecords(t, px, now, 60)
		b := newBrowser(t, px)
		b.login()

		t.Run("list shows expiry and pages", func(t *testing.T) {
			page := b.page("/dashboard/keys")
			rows := matches(keyRowRe, page)
			if len(rows) != 50 {
				t.Fatalf("%d rows, want 50", len(rows))
			}
			if rows[0] != recs[0].ID || rows[49] != recs[49].ID {
				t.Fatal("keys are not newest first")
			}
			contains(t, "keys", page, "seeded-000", recs[0].ExpiresAt.Format("2006-01-02 15:04:05"), "23h 59m", `class="state completed"`)
			next := older(page)
			if next == "" {
				t.Fatal("no Older link with 60 keys")
			}
			page = b.page(next)
			if rows := matches(keyRowRe, page); len(rows) != 10 || rows[0] != recs[50].ID || older(page) != "" {
				t.Fatalf("second page: %d rows", len(rows))
			}
			contains(t, "keys page 2", page, "← Newest")
		})

		t.Run("search by key", func(t *testing.T) {
			page := b.page("/dashboard/keys?key=seeded-007")
			if rows := matches(keyRowRe, page); len(rows) != 1 || rows[0] != recs[7].ID {
				t.Fatalf("search found %v", rows)
			}
			page = b.page("/dashboard/keys?state=released")
			if rows := matches(keyRowRe, page); len(rows) != 0 {
				t.Fatalf("state filter found %d", len(rows))
			}
		})

		t.Run("detail pretty-prints and escapes", func(t *testing.T) {
			page := b.page("/dashboard/keys/" + recs[3].ID)
			contains(t, "key detail", page, "seeded-003", "&#34;n&#34;: 3,", "&lt;b&gt;x&lt;/b&gt;", "23h 59m left", "Delete…")
			if strings.Contains(page, "<b>x</b>") {
				t.Fatal("stored body is not escaped")
			}
		})

		t.Run("delete needs confirmation", func(t *testing.T) {
			page := b.page("/dashboard/keys/" + recs[5].ID)
			resp, body := b.post("/dashboard/keys/"+recs[5].ID+"/delete", url.Values{"_csrf": {csrfOf(t, page)}})
			if resp.StatusCode != 200 || !strings.Contains(body, "Delete this key?") {
				t.Fatalf("confirm step: %d", resp.StatusCode)
			}
			if _, err := px.App.Store.IdempotencyByID(t.Context(), recs[5].ID); err != nil {
				t.Fatal("deleted before confirmation")
			}
			resp, _ = b.post("/dashboard/keys/"+recs[5].ID+"/delete", url.Values{"_csrf": {csrfOf(t, body)}, "confirm": {"yes"}})
			if resp.StatusCode != http.StatusSeeOther {
				t.Fatalf("delete: %d", resp.StatusCode)
			}
			if _, err := px.App.Store.IdempotencyByID(t.Context(), recs[5].ID); err == nil {
				t.Fatal("key still stored")
			}
			contains(t, "after delete", b.page(resp.Header.Get("Location")), "The key was expired")
			if resp, _ := b.get("/dashboard/keys/" + recs[5].ID); resp.StatusCode != 404 {
				t.Fatalf("deleted key page: %d", resp.StatusCode)
			}
		})

		t.Run("proxied keyed request appears with replays", func(t *testing.T) {
			body := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`
			for range 2 {
				proxyPost(t, px, apptest.ClientKey, "/v1/chat/completions", body, "live-key-1")
			}
			// The replay is counted in the background, just after it is answered.
			var page string
			apptest.Eventually(t, 10*time.Second, func() bool {
				page = b.page("/dashboard/keys?key=live-key-1")
				return strings.Contains(page, `1<span class="under">last `)
			}, "the replay was never counted on the keys page")
			rows := matches(keyRowRe, page)
			if len(rows) != 1 {
				t.Fatalf("%d rows for live-key-1", len(rows))
			}
			contains(t, "live key", page, ">alpha<", "23h 59m left", `1<span class="under">last `, "s ago")
			detail := b.page("/dashboard/keys/" + rows[0])
			contains(t, "live key detail", detail, "&#34;object&#34;: &#34;chat.completion&#34;", "X-Request-Id")
		})
	})
}

func proxyPost(t *testing.T, px *apptest.Instance, key, path, body, idemKey string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest("POST", px.URL+path, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	if idemKey != "" {
		req.Header.Set("Idempotency-Key", idemKey)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("proxied request: %d", resp.StatusCode)
	}
	return resp
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Every page but the login form and static files sends visitors without a
// session to the login form, for GET and POST alike.
func TestDashboardRequiresLogin(t *testing.T) {
	apptest.EachDB(t, adminEnv, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		b := newBrowser(t, px)
		for _, r := range []struct{ method, path string }{
			{"GET", "/dashboard"}, {"GET", "/dashboard/"}, {"GET", "/dashboard?window=7d"},
			{"GET", "/dashboard/requests"}, {"GET", "/dashboard/requests/1"},
			{"GET", "/dashboard/keys"}, {"GET", "/dashboard/keys/abc"},
			{"POST", "/dashboard/keys/abc/delete"}, {"POST", "/dashboard/logout"},
		} {
			resp, _ := b.do(r.method, r.path, url.Values{}, nil)
			loc := resp.Header.Get("Location")
			if (resp.StatusCode != 302 && resp.StatusCode != 303) || !strings.HasPrefix(loc, "/dashboard/login") {
				t.Errorf("%s %s: %d → %q, want a redirect to the login form", r.method, r.path, resp.StatusCode, loc)
			}
		}
		// A forged session cookie is no session.
		u, _ := url.Parse(px.URL + "/dashboard")
		b.http.Jar.SetCookies(u, []*http.Cookie{{Name: "dashboard_session", Value: "00000000-forged", Path: "/dashboard"}})
		if resp, _ := b.get("/dashboard"); resp.StatusCode != 303 {
			t.Errorf("forged session: %d", resp.StatusCode)
		}
		// The redirect remembers the page, and signing in returns there.
		resp, _ := b.get("/dashboard/keys?key=x")
		if loc := resp.Header.Get("Location"); loc != "/dashboard/login?next=%2Fdashboard%2Fkeys%3Fkey%3Dx" {
			t.Errorf("Location = %q", loc)
		}
		page := b.page("/dashboard/login?next=%2Fdashboard%2Fkeys%3Fkey%3Dx")
		resp, _ = b.post("/dashboard/login", url.Values{"_csrf": {csrfOf(t, page)}, "password": {adminPassword}, "next": {"/dashboard/keys?key=x"}})
		if loc := resp.Header.Get("Location"); loc != "/dashboard/keys?key=x" {
			t.Errorf("after login Location = %q", loc)
		}
		// Login form and assets need no session.
		if resp, body := b.get("/dashboard/static/dashboard.css"); resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/css") || !strings.Contains(body, ":root") {
			t.Errorf("stylesheet: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
		}
	})
}

func TestDashboardCSRF(t *testing.T) {
	apptest.EachDB(t, adminEnv, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		recs := seedKeyRecords(t, px, time.Now().UTC(), 1)
		b := newBrowser(t, px)

		// The login form itself is protected.
		b.page("/dashboard/login")
		for name, form := range map[string]url.Values{
			"missing": {"password": {adminPassword}},
			"forged":  {"password": {adminPassword}, "_csrf": {"6f1ed002-ab5d-4b1c-9a1e-f2a4d0b0c0de"}},
		} {
			resp, body := b.post("/dashboard/login", form)
			if resp.StatusCode != 403 || resp.Header.Get("Set-Cookie") != "" && strings.Contains(resp.Header.Get("Set-Cookie"), "dashboard_session") {
				t.Errorf("login with %s token: %d", name, resp.StatusCode)
			}
			contains(t, "login csrf "+name, body, "sign-in form had expired")
		}

		b.login()
		for name, form := range map[string]url.Values{
			"missing": {"confirm": {"yes"}},
			"forged":  {"confirm": {"yes"}, "_csrf": {"6f1ed002-ab5d-4b1c-9a1e-f2a4d0b0c0de"}},
		} {
			resp, body := b.post("/dashboard/keys/"+recs[0].ID+"/delete", form)
			if resp.StatusCode != 403 {
				t.Errorf("delete with %s token: %d", name, resp.StatusCode)
			}
			contains(t, "csrf page", body, "<!doctype html>", "security token")
		}
		if _, err := px.App.Store.IdempotencyByID(t.Context(), recs[0].ID); err != nil {
			t.Fatal("a forged form deleted the key")
		}
		// A valid token from another browser is not enough: it must match
		// this browser's CSRF cookie.
		other := newBrowser(t, px)
		otherToken := csrfOf(t, other.page("/dashboard/login"))
		if resp, _ := b.post("/dashboard/keys/"+recs[0].ID+"/delete", url.Values{"confirm": {"yes"}, "_csrf": {otherToken}}); resp.StatusCode != 403 {
			t.Errorf("another browser's token: %d", resp.StatusCode)
		}
		if resp, _ := b.post("/dashboard/logout", url.Values{}); resp.StatusCode != 403 {
			t.Errorf("logout without token: %d", resp.StatusCode)
		}
	})
}

func TestDashboardLoginThrottle(t *testing.T) {
	apptest.EachDB(t, adminEnv, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		b := newBrowser(t, px)
		token := csrfOf(t, b.page("/dashboard/login"))
		attempt := func(password string) (*http.Response, string) {
			return b.post("/dashboard/login", url.Values{"_csrf": {token}, "password": {password}})
		}
		// Successful sign-ins (from the same address) do not count. Each
		// spends its form's token, so each uses a browser of its own.
		for range 3 {
			newBrowser(t, px).login()
		}
		if resp, _ := attempt(adminPassword); resp.StatusCode != 303 {
			t.Fatalf("right password: %d", resp.StatusCode)
		}
		// The token was spent by signing in: the form rotates.
		if resp, _ := b.post("/dashboard/login", url.Values{"_csrf": {token}, "password": {adminPassword}}); resp.StatusCode != 403 {
			t.Fatalf("login token reused after sign-in: %d, want 403", resp.StatusCode)
		}
		b = newBrowser(t, px)
		token = csrfOf(t, b.page("/dashboard/login"))
		for i := range 5 {
			resp, body := attempt(fmt.Sprintf("wrong-password-%d", i))
			if resp.StatusCode != 401 {
				t.Fatalf("wrong password %d: %d", i+1, resp.StatusCode)
			}
			contains(t, "wrong password", body, "That password is not correct.", `name="password"`)
		}
		for _, pw := range []string{"wrong-again", adminPassword} {
			resp, body := attempt(pw)
			if resp.StatusCode != 429 {
				t.Fatalf("attempt over the limit: %d", resp.StatusCode)
			}
			if resp.Header.Get("Retry-After") == "" {
				t.Error("429 without Retry-After")
			}
			contains(t, "throttled", body, "<!doctype html>", "Too many failed sign-in attempts")
			if strings.Contains(body, `name="password"`) {
				t.Error("throttled page still shows the form")
			}
		}
	})
}

func TestDashboardCookies(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"ADMIN_PASSWORD": adminPassword})
	b := newBrowser(t, px)
	page := b.page("/dashboard/login")
	resp, _ := b.post("/dashboard/login", url.Values{"_csrf": {csrfOf(t, page)}, "password": {adminPassword}})
	var session *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == "dashboard_session" {
			session = c
		}
	}
	if session == nil {
		t.Fatal("no session cookie")
	}
	if !session.HttpOnly || session.SameSite != http.SameSiteLaxMode || session.Path != "/dashboard" || session.Secure {
		t.Errorf("session cookie = %+v; want HttpOnly, SameSite=Lax, Path=/dashboard, not Secure over plain HTTP", session)
	}
	// The session id changes on sign-in (no fixation) and the old one is dead.
	b2 := newBrowser(t, px)
	b2.page("/dashboard/login")
	u, _ := url.Parse(px.URL + "/dashboard")
	b2.http.Jar.SetCookies(u, []*http.Cookie{{Name: "dashboard_session", Value: session.Value, Path: "/dashboard"}})
	if resp, _ := b2.get("/dashboard"); resp.StatusCode != 200 {
		t.Fatalf("session cookie does not sign in: %d", resp.StatusCode)
	}
	// Sign out ends the session server-side, not only in this browser.
	resp, _ = b.post("/dashboard/logout", url.Values{"_csrf": {csrfOf(t, b.page("/dashboard"))}})
	if resp.StatusCode != 303 {
		t.Fatalf("logout: %d", resp.StatusCode)
	}
	if resp, _ := b2.get("/dashboard"); resp.StatusCode != 303 {
		t.Fatalf("session still valid after logout: %d", resp.StatusCode)
	}
}

func TestDashboardDisabledWithoutPassword(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, nil)
	b := newBrowser(t, px)
	for _, path := range []string{"/dashboard", "/dashboard/login", "/dashboard/static/dashboard.css"} {
		if resp, _ := b.get(path); resp.StatusCode != 404 {
			t.Errorf("%s: %d, want 404", path, resp.StatusCode)
		}
	}
}

// The overview warns about an open proxy and never shows any key, with
// real traffic from both clients in the log.
func TestDashboardWarningsAndNoKeys(t *testing.T) {
	up := apptest.NewUpstream(t)
	open := apptest.Start(t, up.URL, map[string]string{"ADMIN_PASSWORD": adminPassword, "PROXY_API_KEYS": "", "ALLOW_OPEN_PROXY": "true"})
	b := newBrowser(t, open)
	// The public login page tells no anonymous visitor that the port is open.
	if strings.Contains(b.page("/dashboard/login"), "Open proxy") {
		t.Error("the login page shows the open-proxy banner")
	}
	b.login()
	contains(t, "open proxy overview", b.page("/dashboard"), "Open proxy.")

	px := apptest.Start(t, up.URL, map[string]string{"ADMIN_PASSWORD": adminPassword})
	proxyPost(t, px, apptest.ClientKey, "/v1/chat/completions", `{"model":"gpt-4o-mini"}`, "k-alpha")
	proxyPost(t, px, apptest.ClientKey2, "/v1/embeddings", `{"model":"text-embedding-3-small","input":"x"}`, "")
	b = newBrowser(t, px)
	b.login()
	apptest.Eventually(t, 10*time.Second, func() bool {
		page := b.page("/dashboard/requests") // assertNoKeys runs on every response
		return strings.Contains(page, ">beta<") && strings.Contains(page, ">alpha<")
	}, "proxied requests never appeared in the log")
	for _, path := range []string{"/dashboard", "/dashboard?window=7d", "/dashboard/keys", "/dashboard/keys?key=k-alpha"} {
		page := b.page(path)
		if strings.Contains(page, "Open proxy") {
			t.Errorf("%s warns of an open proxy", path)
		}
	}
	id := matches(requestRowRe, b.page("/dashboard/requests"))[0]
	b.page("/dashboard/requests/" + id)
	b.page("/dashboard/keys/" + matches(keyRowRe, b.page("/dashboard/keys"))[0])
	_, _ = b.get("/dashboard/nope")
}

// Two replicas on one PostgreSQL share sessions, CSRF tokens and the login
// throttle: all three live in kv_store, not in a process.
func TestDashboardStateIsSharedByReplicas(t *testing.T) {
	dbURL := testdb.PostgresURL(t)
	up := apptest.NewUpstream(t)
	env := map[string]string{"ADMIN_PASSWORD": adminPassword, "DATABASE_URL": dbURL}
	a, b := apptest.Start(t, up.URL, env), apptest.Start(t, up.URL, env)

	// Form from A, sign-in on B, pages on A: one browser, two replicas
	// behind a load balancer. Cookies ignore ports (RFC 6265 §8.5), so one
	// jar serves both, as a browser's would.
	onA := newBrowser(t, a)
	token := csrfOf(t, onA.page("/dashboard/login"))
	onB := &browser{t: t, base: b.URL, http: onA.http}
	resp, body := onB.post("/dashboard/login", url.Values{"_csrf": {token}, "password": {adminPassword}})
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("sign-in on B with A's form: %d\n%s", resp.StatusCode, body)
	}
	onA.page("/dashboard")
	onA.page("/dashboard/keys")

	// Failed attempts count across replicas.
	attacker := newBrowser(t, a)
	tokenA := csrfOf(t, attacker.page("/dashboard/login"))
	for i := range 5 {
		base := []string{a.URL, b.URL}[i%2]
		attacker.base = base
		if resp, _ := attacker.post("/dashboard/login", url.Values{"_csrf": {tokenA}, "password": {"nope-" + fmt.Sprint(i)}}); resp.StatusCode != 401 {
			t.Fatalf("attempt %d on %s: %d", i+1, base, resp.StatusCode)
		}
	}
	attacker.base = a.URL
	if resp, _ := attacker.post("/dashboard/login", url.Values{"_csrf": {tokenA}, "password": {adminPassword}}); resp.StatusCode != 429 {
		t.Fatalf("sixth attempt after five spread over two replicas: %d, want 429", resp.StatusCode)
	}
}

// A proxy adds well under a millisecond: requests of 1 ms must read as
// 1 ms on the overview, not as the middle of a 0–50 ms bucket.
func TestDashboardLatencyOfFastRequests(t *testing.T) {
	apptest.EachDB(t, adminEnv, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		now := time.Now().UTC()
		logs := make([]models.RequestLog, 100)
		for i := range logs {
			logs[i] = models.RequestLog{CreatedAt: now.Add(-time.Duration(i) * time.Second), Client: "alpha", Method: "POST",
				Path: "/v1/chat/completions", Model: "gpt-4o-mini", Status: 200, Outcome: models.OutcomeProxied, DurationMs: 1}
		}
		logs[99].DurationMs = 40 // p95 stays 1 ms, the mean moves
		seedLogs(t, px, logs)
		b := newBrowser(t, px)
		b.login()
		page := b.page("/dashboard?window=1h")
		m := latencyTileRe.FindStringSubmatch(page)
		if m == nil {
			t.Fatalf("no latency tile:\n%s", page)
		}
		t.Logf("latency tile: p50 %q, p95 %q", html.UnescapeString(m[1]), html.UnescapeString(m[2]))
		if m[1] != "1 ms" || m[2] != "1 ms" {
			t.Errorf("1 ms requests shown as p50 %q, p95 %q; want 1 ms and 1 ms", m[1], m[2])
		}
	})
}

var latencyTileRe = regexp.MustCompile(`<dd class="big">([^<]*) <small>p50</small></dd>\s*<dd class="sub">([^<]*) p95`)

// A key released because upstream answered 500 says so on its page: retry
// allowed, and why; not "has not completed" beside a countdown. And a
// ?status=5xx link shows 5xx selected in the filter it applies.
func TestDashboardReleasedKeyAndStatusFilter(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"ADMIN_PASSWORD": adminPassword})
	req, _ := http.NewRequest("POST", px.URL+"/v1/chat/completions?test_status=500", strings.NewReader(`{"model":"gpt-4o-mini"}`))
	req.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", "released-by-500")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != 500 {
		t.Fatalf("upstream 500 answered %d", resp.StatusCode)
	}
	b := newBrowser(t, px)
	b.login()
	var ids []string
	apptest.Eventually(t, 10*time.Second, func() bool {
		ids = matches(keyRowRe, b.page("/dashboard/keys?state=released"))
		return len(ids) == 1
	}, "the released key never appeared")
	page := b.page("/dashboard/keys/" + ids[0])
	contains(t, "released key page", page, "released", "Allowed now", "upstream status 500", "executes again")
	for _, wrong := range []string{"has not completed", " left</strong>"} {
		if strings.Contains(page, wrong) {
			t.Errorf("released key page says %q", wrong)
		}
	}
	apptest.Eventually(t, 10*time.Second, func() bool {
		return len(matches(requestRowRe, b.page("/dashboard/requests?status=5xx"))) == 1
	}, "the 500 never appeared in the request log")
	page = b.page("/dashboard/requests?status=5xx")
	contains(t, "status filter", page, `<option value="5" selected>5xx</option>`)
	if strings.Contains(page, `<option value="" selected`) {
		t.Error("dropdown says any")
	}
}

// When the upstream refuses OPENAI_API_KEY, every page says so.
func TestDashboardBannerWhenUpstreamRefusesTheKey(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"ADMIN_PASSWORD": adminPassword})
	b := newBrowser(t, px)
	b.login()
	const banner = "The upstream refuses <code>OPENAI_API_KEY</code>"
	if page := b.page("/dashboard"); strings.Contains(page, banner) {
		t.Fatal("banner shown before any refusal")
	}
	// The upstream answers 401 invalid_api_key.
	req, _ := http.NewRequest("POST", px.URL+"/v1/chat/completions?test_echo_auth=1", strings.NewReader(`{"model":"m"}`))
	req.Header.Set("Authorization", "Bearer "+apptest.ClientKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	for _, path := range []string{"/dashboard", "/dashboard/requests", "/dashboard/keys"} {
		contains(t, path, b.page(path), banner)
	}
}

// adminEnv turns the dashboard on.
var adminEnv = map[string]string{"ADMIN_PASSWORD": adminPassword}
