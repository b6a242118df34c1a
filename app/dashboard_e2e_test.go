package app_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// artifacts is where the browser test saves its screenshots: the
// repository's testdata/artifacts, which .gitignore leaves out. Tests run
// in the package directory, app/.
var artifacts = filepath.Join("..", "testdata", "artifacts")

// chromium finds a Chromium or Chrome binary; CHROME_PATH wins.
func chromium() string {
	if p := os.Getenv("CHROME_PATH"); p != "" {
		return p
	}
	for _, name := range []string{"/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// TestDashboardInBrowser walks the dashboard in headless Chromium as an
// operator would: traffic goes through /v1, the operator signs in with the
// form, finds both requests in the log and the key with its expiry, deletes
// the key with its confirmation, and the same key then executes again.
// Every page is saved as a full-page screenshot in testdata/artifacts.
func TestDashboardInBrowser(t *testing.T) {
	chrome := chromium()
	if chrome == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("no Chromium binary: the browser test cannot run under CI")
		}
		t.Skip("no Chromium binary (set CHROME_PATH): skipping the browser test")
	}
	if err := os.MkdirAll(artifacts, 0o755); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"ADMIN_PASSWORD": adminPassword}
	if os.Getenv("TEST_DATABASE_URL") != "" {
		env["DATABASE_URL"] = testdb.PostgresURL(t)
	}
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, env)

	// Background traffic of the past day, so the charts and lists have
	// something to draw, and a few stored keys in other states.
	seedLogs(t, px, backgroundTraffic(time.Now().UTC()))
	seedBrowserKeys(t, px, time.Now().UTC())

	// Traffic: one keyed and one unkeyed request, through /v1 with net/http.
	const idemKey = "e2e-order-42"
	chat := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}`
	proxyPost(t, px, apptest.ClientKey, "/v1/chat/completions", chat, idemKey)
	proxyPost(t, px, apptest.ClientKey2, "/v1/embeddings", `{"model":"text-embedding-3-small","input":"hi"}`, "")
	if r := proxyPost(t, px, apptest.ClientKey, "/v1/chat/completions", chat, idemKey); r.Header.Get("Idempotent-Replayed") != "true" {
		t.Fatal("the retry was not replayed")
	}
	callsAfterTraffic := up.Calls()

	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(chrome),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-background-networking", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 900),
	)
	defer cancelAlloc()
	ctx, cancel := chromedp.NewContext(alloc)
	defer cancel()
	// Start the browser on the long-lived context, then bound the walk.
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start Chromium: %v", err)
	}
	ctx, cancelWalk := context.WithTimeout(ctx, 2*time.Minute)
	defer cancelWalk()

	do := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(ctx, steps...); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	text := func() string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Evaluate[string]("document.body.innerText"))
		if err != nil {
			t.Fatalf("read page: %v", err)
		}
		assertNoKeys(t, "browser page", s)
		return s
	}
	path := func() string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Evaluate[string]("location.pathname + location.search"))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	shot := func(name string) {
		t.Helper()
		png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatalf("screenshot %s: %v", name, err)
		}
		if err := os.WriteFile(filepath.Join(artifacts, name+".png"), png, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	// Without a session the dashboard sends us to the login form.
	do("open dashboard", chromedp.Navigate(px.URL+"/dashboard/keys"), chromedp.WaitVisible(chromedp.ID("password")))
	if p := path(); !strings.HasPrefix(p, "/dashboard/login") {
		t.Fatalf("landed on %s, want the login form", p)
	}
	shot("01-login")

	// A wrong password first, then the right one.
	do("wrong password",
		chromedp.SendKeys(chromedp.ID("password"), "not-the-password"),
		chromedp.Submit(chromedp.ID("password")),
		chromedp.WaitVisible(chromedp.CSS(".flash.bad")))
	if !strings.Contains(text(), "That password is not correct.") {
		t.Fatal("no message for a wrong password")
	}
	shot("02-login-wrong")
	do("sign in",
		chromedp.SendKeys(chromedp.ID("password"), adminPassword),
		chromedp.Submit(chromedp.ID("password")),
		chromedp.WaitVisible(chromedp.CSS(`form[role="search"]`)))
	if p := path(); p != "/dashboard/keys" {
		t.Fatalf("after sign-in at %s, want back at /dashboard/keys", p)
	}

	// The request log is written in the background: reload until both
	// requests show, within a deadline.
	last := new(strings.Builder) // the rows last seen, for the failure message
	apptest.Eventually(t, 20*time.Second, func() bool {
		do("request log", chromedp.Navigate(px.URL+"/dashboard/requests"), chromedp.WaitVisible(chromedp.ID("f-status")))
		// The three newest rows are ours; the seeded traffic is older.
		s, err := chromedp.Run(ctx, chromedp.Evaluate[string](
			`Array.from(document.querySelectorAll("table.list tbody tr")).slice(0, 3).map(r => r.innerText).join("\n")`))
		if err != nil {
			t.Fatal(err)
		}
		if strings.Count(s, idemKey) == 2 && strings.Count(s, "/v1/embeddings") == 1 {
			if !strings.Contains(s, "beta") || !strings.Contains(s, "alpha") || !strings.Contains(s, "replayed") {
				t.Fatalf("request log lacks clients or the replay:\n%s", s)
			}
			return true
		}
		last.Reset()
		last.WriteString(s)
		return false
	}, "requests never appeared in the log:\n%s", last)
	shot("04-requests")

	do("request detail", chromedp.Click(chromedp.CSS(`table.list tbody tr:nth-child(3) td a`)), chromedp.WaitVisible(chromedp.CSS(`dl.props`)))
	if s := text(); !strings.Contains(s, "Request #") || !strings.Contains(strings.ToLower(s), "client ip") {
		t.Fatalf("request detail:\n%s", s)
	}
	shot("05-request-detail")

	do("overview", chromedp.Navigate(px.URL+"/dashboard?window=24h"), chromedp.WaitVisible(chromedp.CSS(`svg.chart`)))
	if s := text(); !strings.Contains(s, "Requests by status") || !strings.Contains(s, "Top models") {
		t.Fatalf("overview:\n%s", s)
	}
	shot("03-overview")

	// The key, its expiry and time left.
	do("keys", chromedp.Navigate(px.URL+"/dashboard/keys"), chromedp.WaitVisible(chromedp.CSS(`table.list`)))
	s := text()
	for _, want := range []string{idemKey, "completed", "expires at", "23h 59m", "alpha"} {
		if !strings.Contains(strings.ToLower(s), strings.ToLower(want)) {
			t.Fatalf("keys page lacks %q:\n%s", want, s)
		}
	}
	shot("06-keys")

	do("key detail", chromedp.Click(chromedp.CSS(`td.key a[title="`+idemKey+`"]`)), chromedp.WaitVisible(chromedp.CSS(`pre.code`)))
	if s := text(); !strings.Contains(s, `"object": "chat.completion"`) || !strings.Contains(s, "left") {
		t.Fatalf("key detail:\n%s", s)
	}
	shot("07-key-detail")

	do("delete", chromedp.Click(chromedp.CSS(`button.danger`)), chromedp.WaitVisible(chromedp.CSS(`.confirm`)))
	if s := text(); !strings.Contains(s, "Delete this key?") || !strings.Contains(s, idemKey) {
		t.Fatalf("confirmation:\n%s", s)
	}
	shot("08-key-delete-confirm")
	do("confirm delete", chromedp.Click(chromedp.CSS(`.confirm button.danger`)), chromedp.WaitVisible(chromedp.CSS(`.flash.ok`)))
	s = text()
	if !strings.Contains(s, "The key was expired") || strings.Contains(s, idemKey) {
		t.Fatalf("after delete:\n%s", s)
	}
	shot("09-keys-after-delete")

	// The same key now executes again upstream instead of replaying.
	if r := proxyPost(t, px, apptest.ClientKey, "/v1/chat/completions", chat, idemKey); r.Header.Get("Idempotent-Replayed") != "" {
		t.Fatal("the deleted key was replayed")
	}
	if got := up.Calls(); got != callsAfterTraffic+1 {
		t.Fatalf("upstream calls = %d, want %d: the key did not execute again", got, callsAfterTraffic+1)
	}
	do("keys again", chromedp.Navigate(px.URL+"/dashboard/keys?key="+idemKey), chromedp.WaitVisible(chromedp.CSS(`table.list`)))
	if s := text(); !strings.Contains(s, idemKey) || !strings.Contains(s, "never") {
		t.Fatalf("the re-executed key is not listed as new:\n%s", s)
	}

	// A stored stream shows as its list of events; a missing page as an
	// HTML error page.
	do("stream key", chromedp.Navigate(px.URL+"/dashboard/keys?key=stream-7f3a"), chromedp.Click(chromedp.CSS(`td.key a`)),
		chromedp.WaitVisible(chromedp.CSS(`ol.events`)))
	if s := text(); !strings.Contains(s, "3 events") || !strings.Contains(s, "response.output_text.delta") {
		t.Fatalf("stream key detail:\n%s", s)
	}
	shot("13-key-stream")
	do("not found", chromedp.Navigate(px.URL+"/dashboard/keys/"+strings.Repeat("0", 64)), chromedp.WaitVisible(chromedp.CSS(`.error-page`)))
	shot("14-not-found")

	// Client keys: one with limits in use, one revoked, shown read-only.
	ctxDB := context.Background()
	if _, _, err := px.App.Store.CreateClientKey(ctxDB, "billing-service", models.ClientKeyLimits{RPM: 600, BudgetMicros: 25_000_000, BudgetPeriod: "month", Models: []string{"gpt-4o-mini"}}); err != nil {
		t.Fatal(err)
	}
	old, _, err := px.App.Store.CreateClientKey(ctxDB, "old-batch-job", models.ClientKeyLimits{TPM: 100_000, Notes: "replaced by billing-service"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := px.App.Store.RevokeClientKey(ctxDB, old.ID); err != nil {
		t.Fatal(err)
	}
	do("client keys", chromedp.Navigate(px.URL+"/dashboard/client-keys"), chromedp.WaitVisible(chromedp.CSS(`table.list`)))
	shot("15-client-keys")
	do("revoked client key", chromedp.Navigate(px.URL+"/dashboard/client-keys/"+old.ID), chromedp.WaitVisible(chromedp.CSS(`fieldset[disabled]`)))
	if s := text(); !strings.Contains(s, "A revoked key cannot change") || strings.Contains(s, "Save") {
		t.Fatalf("revoked key page:\n%s", s)
	}
	shot("16-client-key-revoked")

	// A phone: the same pages at 390 px, tables scrolling sideways.
	do("phone", chromedp.EmulateViewport(390, 844, chromedp.EmulateScale(2)))
	for _, p := range []struct{ name, path, wait string }{
		{"10-phone-overview", "/dashboard", `svg.chart`},
		{"11-phone-requests", "/dashboard/requests", `table.list`},
		{"12-phone-keys", "/dashboard/keys", `table.list`},
		{"17-phone-client-keys", "/dashboard/client-keys", `table.list`},
	} {
		do(p.name, chromedp.Navigate(px.URL+p.path), chromedp.WaitVisible(chromedp.CSS(p.wait)))
		overflow, err := chromedp.Run(ctx, chromedp.Evaluate[bool]("document.documentElement.scrollWidth > window.innerWidth + 1"))
		if err != nil {
			t.Fatal(err)
		}
		if overflow {
			t.Errorf("%s: the page scrolls sideways on a phone", p.name)
		}
		shot(p.name)
	}

	// Sign out through the header button.
	do("sign out", chromedp.EmulateViewport(1280, 900), chromedp.Navigate(px.URL+"/dashboard"),
		chromedp.Click(chromedp.CSS(`form.signout button`)), chromedp.WaitVisible(chromedp.ID("password")))
	if !strings.Contains(text(), "You are signed out.") {
		t.Fatal("no sign-out notice")
	}
	resp, err := http.Get(px.URL + "/dashboard/static/dashboard.css")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("stylesheet: %v", err)
	}
	_ = resp.Body.Close()
	t.Logf("screenshots in %s", mustAbs(artifacts))
}

func mustAbs(p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		return p
	}
	return a
}

// backgroundTraffic is a day of plausible requests: more by day, a burst of
// 5xx one afternoon, a few 4xx and replays throughout.
func backgroundTraffic(now time.Time) []models.RequestLog {
	var logs []models.RequestLog
	models3 := []string{"gpt-4o-mini", "gpt-4.1", "text-embedding-3-small"}
	for i := range 1400 {
		at := now.Add(-time.Duration(i) * 61 * time.Second).Add(-time.Minute)
		l := models.RequestLog{
			CreatedAt: at, Client: []string{"alpha", "beta", "batch-jobs"}[i%3], Method: "POST",
			Path: "/v1/chat/completions", Model: models3[i%5%3], Status: 200, Outcome: models.OutcomeProxied,
			DurationMs: int64(180 + (i*37)%900), PromptTokens: int64(200 + i%300), CompletionTokens: int64(40 + i%120),
		}
		if l.Model == "text-embedding-3-small" {
			l.Path, l.CompletionTokens, l.DurationMs = "/v1/embeddings", 0, int64(30+i%40)
		}
		l.TotalTokens = l.PromptTokens + l.CompletionTokens
		switch {
		case i%97 == 0:
			l.Status, l.Outcome = 409, models.OutcomeIdempotencyConflict
		case i%23 == 0:
			l.Status, l.Outcome = 429, models.OutcomeProxied
		case i%11 == 0:
			l.Outcome = models.OutcomeReplayed
		case i > 500 && i < 540:
			l.Status, l.Outcome, l.Error = 502, models.OutcomeUpstreamError, "upstream_unreachable"
		}
		if i%7 == 0 {
			l.IdempotencyKey = fmt.Sprintf("job-%05d", i)
		}
		logs = append(logs, l)
	}
	return logs
}

// seedBrowserKeys stores a few older keys: one released after a 503, one
// whose response was too large to keep, one streamed.
func seedBrowserKeys(t *testing.T, px *apptest.Instance, now time.Time) {
	t.Helper()
	sse := "event: response.created\ndata: {\"type\":\"response.created\"}\n\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\"}\n\n"
	for i, r := range []models.IdempotencyRecord{
		{IdemKey: "job-00014", Client: "batch-jobs", Path: "/v1/chat/completions", State: models.StateReleased, ReleaseReason: "upstream_status_503", Status: 0},
		{IdemKey: "report-2025-q2", Client: "beta", Path: "/v1/chat/completions", State: models.StateCompleted, Status: 200, BodySize: 12 << 20},
		{IdemKey: "stream-7f3a", Client: "alpha", Path: "/v1/responses", State: models.StateCompleted, Status: 200, Stream: true,
			Replayable: true, Headers: `{"Content-Type":"text/event-stream"}`, Body: []byte(sse), BodySize: int64(len(sse)), ReplayCount: 3},
	} {
		at := now.Add(-time.Duration(i+1) * 47 * time.Minute)
		r.ID = fmt.Sprintf("%064x", 0xe2e000+i)
		r.Method, r.Fingerprint, r.LockedUntil, r.CreatedAt, r.UpdatedAt, r.Attempts = "POST", "f", at, at, at, 1
		r.ExpiresAt = at.Add(24 * time.Hour)
		if r.Headers == "" {
			r.Headers = "{}"
		}
		if r.ReplayCount > 0 {
			last := now.Add(-5 * time.Minute)
			r.LastReplayAt = &last
		}
		if err := px.App.Store.DB().Create(&r).Error; err != nil {
			t.Fatal(err)
		}
	}
}
