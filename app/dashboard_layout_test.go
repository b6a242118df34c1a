package app_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// layoutProblems lists, for the page in the browser, every table that
// scrolls sideways and every cell that is clipped: outside the viewport,
// or its text cut inside it. Empty means every column is readable.
const layoutProblems = `(() => {
  const out = [];
  const vw = document.documentElement.clientWidth;
  if (document.documentElement.scrollWidth > vw + 1)
    out.push("page scrolls sideways: " + document.documentElement.scrollWidth + " > " + vw);
  document.querySelectorAll("table").forEach((t, i) => {
    const box = t.closest(".table-scroll") || t.parentElement;
    if (box.scrollWidth > box.clientWidth + 1)
      out.push("table " + i + " (" + t.className + ") scrolls: " + box.scrollWidth + " > " + box.clientWidth);
    t.querySelectorAll("th, td").forEach(c => {
      const r = c.getBoundingClientRect();
      if (r.width === 0 && r.height === 0) return; // not displayed (e.g. a hidden header row)
      const name = (c.dataset.label || c.innerText).trim().slice(0, 24);
      if (r.left < -1 || r.right > vw + 1)
        out.push("table " + i + " cell " + JSON.stringify(name) + " outside the viewport: " + Math.round(r.left) + ".." + Math.round(r.right));
      else if (c.scrollWidth > c.clientWidth + 1)
        out.push("table " + i + " cell " + JSON.stringify(name) + " cut: " + c.scrollWidth + " > " + c.clientWidth);
    });
  });
  return out.join("\n");
})()`

// TestDashboardTablesFit opens every table page in Chromium at a laptop
// width (1366 px) and a phone width (390 px), with long names, stream rows
// and long keys, and fails on any table that scrolls sideways or any cell
// cut off. Screenshots go to testdata/artifacts (and SHOTS_DIR if set).
func TestDashboardTablesFit(t *testing.T) {
	chrome := chromium()
	if chrome == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("no Chromium binary: the browser test cannot run under CI")
		}
		t.Skip("no Chromium binary (set CHROME_PATH): skipping the browser test")
	}
	dirs := []string{artifacts}
	if d := os.Getenv("SHOTS_DIR"); d != "" {
		dirs = append(dirs, d)
	}
	for _, d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"ADMIN_PASSWORD": adminPassword})
	now := time.Now().UTC()
	seedLogs(t, px, wideTraffic(now))
	seedBrowserKeys(t, px, now)
	seedWideKeys(t, px, now)
	ckID := seedWideClientKeys(t, px, now)

	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(chrome), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true), chromedp.UserDataDir(t.TempDir()))
	defer cancelAlloc()
	ctx, cancel := chromedp.NewContext(alloc)
	defer cancel()
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start Chromium: %v", err)
	}
	ctx, cancelRun := context.WithTimeout(ctx, 2*time.Minute)
	defer cancelRun()
	if err := chromedp.Do(ctx, chromedp.EmulateViewport(1366, 900), chromedp.Navigate(px.URL+"/dashboard/login"),
		chromedp.WaitVisible(chromedp.ID("password")), chromedp.SendKeys(chromedp.ID("password"), adminPassword),
		chromedp.Submit(chromedp.ID("password")), chromedp.WaitVisible(chromedp.CSS("svg.chart"))); err != nil {
		t.Fatalf("sign in: %v", err)
	}
	pages := []struct{ name, path string }{
		{"overview", "/dashboard?window=24h"},
		{"requests", "/dashboard/requests"},
		{"keys", "/dashboard/keys"},
		{"key", "/dashboard/keys/" + fmt.Sprintf("%064x", 0xe2e002)},
		{"client-keys", "/dashboard/client-keys"},
		{"client-key", "/dashboard/client-keys/" + ckID},
		{"client-key-new", "/dashboard/client-keys/new"},
	}
	for _, width := range []int64{1366, 390} {
		for _, pg := range pages {
			if err := chromedp.Do(ctx, chromedp.EmulateViewport(width, 900), chromedp.Navigate(px.URL+pg.path),
				chromedp.WaitVisible(chromedp.CSS("footer"))); err != nil {
				t.Fatalf("%s at %d px: %v", pg.name, width, err)
			}
			problems, err := chromedp.Run(ctx, chromedp.Evaluate[string](layoutProblems))
			if err != nil {
				t.Fatal(err)
			}
			// One screen's worth, scrolled to the first table: what a
			// person sees of it.
			if _, err := chromedp.Run(ctx, chromedp.Evaluate[bool](
				`(() => { const t = document.querySelector(".card table"); if (t) window.scrollTo(0, t.getBoundingClientRect().top + scrollY - 60); return true })()`)); err != nil {
				t.Fatal(err)
			}
			png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range dirs {
				if err := os.WriteFile(filepath.Join(d, fmt.Sprintf("fit-%d-%s.png", width, pg.name)), png, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if problems != "" {
				t.Errorf("%s at %d px:\n%s", pg.name, width, strings.ReplaceAll(problems, "\n", "\n  "))
			}
		}
		// The one-time answer to a new client key: the key must fit its
		// field and the page must not scroll sideways.
		if err := chromedp.Do(ctx, chromedp.EmulateViewport(width, 900), chromedp.Navigate(px.URL+"/dashboard/client-keys/new"),
			chromedp.WaitVisible(chromedp.ID("ck-name")), chromedp.SendKeys(chromedp.ID("ck-name"), fmt.Sprintf("browser-made-%d", width)),
			chromedp.Submit(chromedp.ID("ck-name")), chromedp.WaitVisible(chromedp.ID("new-key"))); err != nil {
			t.Fatalf("create a client key at %d px: %v", width, err)
		}
		problems, err := chromedp.Run(ctx, chromedp.Evaluate[string](layoutProblems+` + (() => {
  const k = document.getElementById("new-key");
  return k.getBoundingClientRect().right > document.documentElement.clientWidth + 1 ? "\nthe key field leaves the screen" : "";
})()`))
		if err != nil {
			t.Fatal(err)
		}
		png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range dirs {
			if err := os.WriteFile(filepath.Join(d, fmt.Sprintf("fit-%d-client-key-created.png", width)), png, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if problems != "" {
			t.Errorf("client key created at %d px:\n%s", width, problems)
		}
	}
}

// wideTraffic is recent traffic with the widest values a list shows: stream
// rows, long client and model names, long keys, every outcome.
func wideTraffic(now time.Time) []models.RequestLog {
	var logs []models.RequestLog
	outcomes := []string{models.OutcomeProxied, models.OutcomeIdempotencyConflict, models.OutcomeIdempotencyMismatch,
		models.OutcomeUpstreamError, models.OutcomeReplayed, models.OutcomeClientCancelled}
	for i := range 60 {
		l := models.RequestLog{
			CreatedAt: now.Add(-time.Duration(i) * 20 * time.Second), Client: []string{"batch-jobs-nightly-eu", "alpha"}[i%2],
			Method: "POST", Path: "/v1/chat/completions", Model: []string{"gpt-4o-mini-2024-07-18", "text-embedding-3-large"}[i%2],
			Stream: i%2 == 0, Status: []int{200, 409, 422, 502, 200, 499}[i%6], Outcome: outcomes[i%6],
			DurationMs: int64(12345 + i), PromptTokens: 123456, CompletionTokens: 65432, TotalTokens: 188888,
		}
		if i%3 == 0 {
			l.IdempotencyKey = fmt.Sprintf("order-2025-06-01-customer-48213-attempt-%d", i)
		}
		if i%5 == 0 {
			l.Path = "/v1/responses/resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b/input_items"
		}
		logs = append(logs, l)
	}
	return logs
}

// seedWideKeys stores keys as long as clients send: UUIDs and longer.
func seedWideKeys(t *testing.T, px *apptest.Instance, now time.Time) {
	t.Helper()
	for i := range 6 {
		at := now.Add(-time.Duration(i+1) * time.Minute)
		r := models.IdempotencyRecord{
			ID: fmt.Sprintf("%064x", 0xbeef00+i), IdemKey: fmt.Sprintf("checkout-session-2025-06-01T12:00:00Z-customer-48213-%d", i),
			Client: "batch-jobs-nightly-eu", Method: "POST", Path: "/v1/chat/completions", Fingerprint: "f",
			State: []string{models.StateCompleted, models.StateReleased, models.StateInProgress}[i%3], Status: 200,
			Stream: i%2 == 0, Replayable: true, Headers: "{}", BodySize: 123456, ReplayCount: 12345, Attempts: 1,
			LockedUntil: now.Add(time.Minute), CreatedAt: at, UpdatedAt: at, ExpiresAt: at.Add(24 * time.Hour),
		}
		if err := px.App.Store.DB().Create(&r).Error; err != nil {
			t.Fatal(err)
		}
	}
}

// seedWideClientKeys creates managed client keys with the widest values
// the Client keys page shows (a long name, every limit, a near-full
// budget, a revoked one) and traffic that spends; it returns the wide
// key's id.
func seedWideClientKeys(t *testing.T, px *apptest.Instance, now time.Time) string {
	t.Helper()
	exp := now.Add(90 * 24 * time.Hour)
	wide, _, err := px.App.Store.CreateClientKey(t.Context(), "billing-reconciliation-nightly-batch@eu-west",
		models.ClientKeyLimits{ExpiresAt: &exp, RPM: 1200, TPM: 2_000_000, BudgetMicros: 250_000_000, BudgetPeriod: models.PeriodMonth,
			Models: []string{"gpt-4o-mini", "gpt-4.1-2025-04-14", "text-embedding-3-small"}, Notes: "owned by finance"})
	if err != nil {
		t.Fatal(err)
	}
	small, _, err := px.App.Store.CreateClientKey(t.Context(), "ci", models.ClientKeyLimits{RPM: 60, BudgetMicros: 1_000_000, BudgetPeriod: models.PeriodDay})
	if err != nil {
		t.Fatal(err)
	}
	old, _, err := px.App.Store.CreateClientKey(t.Context(), "retired-laptop", models.ClientKeyLimits{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := px.App.Store.RevokeClientKey(t.Context(), old.ID); err != nil {
		t.Fatal(err)
	}
	if _, _, err := px.App.Store.ReserveBudget(t.Context(), small.ID, models.PeriodStart(models.PeriodDay, now), 930_000, 930_000, small.BudgetMicros); err != nil {
		t.Fatal(err)
	}
	month := models.PeriodStart(models.PeriodMonth, now)
	if _, _, err := px.App.Store.ReserveBudget(t.Context(), wide.ID, month, 144_000_000, 144_000_000, wide.BudgetMicros); err != nil {
		t.Fatal(err)
	}
	if err := px.App.Store.SettleBudget(t.Context(), wide.ID, month, 144_000_000, 144_000_000); err != nil {
		t.Fatal(err)
	}
	var logs []models.RequestLog
	for i := range 40 {
		logs = append(logs, models.RequestLog{CreatedAt: now.Add(-time.Duration(i) * 20 * time.Second), Client: wide.Name, Method: "POST",
			Path: "/v1/chat/completions", Model: "gpt-4o-mini", Status: 200, Outcome: models.OutcomeProxied, DurationMs: 300,
			PromptTokens: 12000, CompletionTokens: 3000, TotalTokens: 15000, CostMicros: 3_600_000})
	}
	logs = append(logs, models.RequestLog{CreatedAt: now.Add(-time.Minute), Client: "ci", Method: "POST", Path: "/v1/chat/completions",
		Model: "in-house-finetune-unpriced", Status: 200, Outcome: models.OutcomeProxied, DurationMs: 200, TotalTokens: 50})
	seedLogs(t, px, logs)
	return wide.ID
}
