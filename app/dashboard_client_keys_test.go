package app_test

import (
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

var newKeyRe = regexp.MustCompile(`<code id="new-key" class="newkey"[^>]*>([^<]+)</code>`)

// usdText is how the dashboard writes a spend under a cent: every digit.
func usdText(micros int64) string {
	return "$" + strconv.FormatFloat(float64(micros)/1e6, 'f', -1, 64)
}

// TestDashboardClientKeys walks a managed key's life on the dashboard:
// created (the key shown once, on a no-store page), listed (never shown
// again), used, edited, revoked (then refused by the proxy), with CSRF
// required and the PROXY_API_KEYS read-only; the spend shown equals the sum
// of the request costs, and a model without a price is flagged.
func TestDashboardClientKeys(t *testing.T) {
	apptest.EachDB(t, adminEnv, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		b := newBrowser(t, px)
		b.login()

		list := b.page("/dashboard/client-keys")
		contains(t, "client keys", list, ">Client keys</a>", "<strong>alpha</strong>", "from the environment", "edit PROXY_API_KEYS")
		if strings.Contains(list, `href="/dashboard/client-keys/alpha"`) {
			t.Fatal("an environment key has an edit link")
		}
		csrf := csrfOf(t, list)
		form := url.Values{"name": {"dash-ci"}, "rpm": {"100"}, "tpm": {""}, "budget_usd": {"5"}, "budget_period": {"day"},
			"models": {"gpt-4o-mini"}, "notes": {"made by the test"}}

		// Without the CSRF token nothing is created.
		if resp, _ := b.post("/dashboard/client-keys", form); resp.StatusCode != http.StatusForbidden {
			t.Fatalf("create without CSRF: %d, want 403", resp.StatusCode)
		}
		if keys, _ := px.App.Store.ListClientKeys(t.Context()); len(keys) != 0 {
			t.Fatalf("a key was created without CSRF: %+v", keys)
		}
		// An environment key's name is refused.
		envForm := url.Values{"_csrf": {csrf}, "name": {"alpha"}}
		if resp, body := b.post("/dashboard/client-keys", envForm); resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, "PROXY_API_KEYS") {
			t.Fatalf("create with an environment name: %d\n%s", resp.StatusCode, body)
		}
		if resp, _ := b.get("/dashboard/client-keys/alpha"); resp.StatusCode != http.StatusNotFound {
			t.Fatalf("edit an environment key: %d, want 404", resp.StatusCode)
		}

		form.Set("_csrf", csrf)
		resp, created := b.post("/dashboard/client-keys", form)
		if resp.StatusCode != http.StatusCreated || resp.Header.Get("Cache-Control") != "no-store" {
			t.Fatalf("create: %d, Cache-Control %q\n%s", resp.StatusCode, resp.Header.Get("Cache-Control"), created)
		}
		m := newKeyRe.FindStringSubmatch(created)
		if m == nil || !strings.HasPrefix(m[1], "pxy_") {
			t.Fatalf("the created page shows no key:\n%s", created)
		}
		key := m[1]
		contains(t, "created", created, "shown only this once")
		keys, err := px.App.Store.ListClientKeys(t.Context())
		if err != nil || len(keys) != 1 || keys[0].Name != "dash-ci" || keys[0].RPM != 100 || keys[0].BudgetMicros != 5_000_000 || keys[0].BudgetPeriod != "day" {
			t.Fatalf("stored: %+v %v", keys, err)
		}
		id, hint := keys[0].ID, "…"+key[len(key)-4:]

		// The proxy takes the key, spends, and the list shows the spend.
		apptest.Eventually(t, 5*time.Second, func() bool { return call(t, px, key, chatMini).status == 200 }, "the new key is accepted")
		for range 2 {
			if r := call(t, px, key, chatMini); r.status != 200 {
				t.Fatalf("call: %d %s", r.status, r.code)
			}
		}
		var spent struct{ N, Sum int64 }
		apptest.Eventually(t, 15*time.Second, func() bool {
			px.App.Store.DB().Raw("SELECT COUNT(*) AS n, COALESCE(SUM(cost_micros), 0) AS sum FROM request_logs WHERE client = 'dash-ci' AND status = 200").Scan(&spent)
			return spent.N == 3
		}, "three logged requests")
		if spent.Sum != 3*chatMiniCost {
			t.Fatalf("logged cost %d, want %d", spent.Sum, 3*chatMiniCost)
		}
		want := usdText(spent.Sum)
		apptest.Eventually(t, 15*time.Second, func() bool {
			list = b.page("/dashboard/client-keys")
			return strings.Count(list, want) >= 3 // today, this period, the budget meter
		}, "the list shows the spend "+want)
		contains(t, "list", list, "dash-ci", hint, `class="state ck-active"`, "/ $5.00 a day", "rpm", "models: gpt-4o-mini")
		over := b.page("/dashboard?window=1h")
		contains(t, "overview", over, "Top models by spend", "Top clients by spend", "Spend over time in USD", want)

		// Edit: the form never holds the key either.
		edit := b.page("/dashboard/client-keys/" + id)
		contains(t, "edit", edit, `value="100"`, `value="5"`, "made by the test", "Revoke this key")
		resp, body := b.post("/dashboard/client-keys/"+id, url.Values{"_csrf": {csrf}, "rpm": {"7"}, "tpm": {"9000"},
			"budget_usd": {"2.5"}, "budget_period": {"month"}, "expires": {"2099-01-31T18:00"}, "notes": {"edited"}})
		if resp.StatusCode != http.StatusSeeOther {
			t.Fatalf("edit: %d\n%s", resp.StatusCode, body)
		}
		k, _ := px.App.Store.ClientKeyByID(t.Context(), id)
		if k.RPM != 7 || k.TPM != 9000 || k.BudgetMicros != 2_500_000 || k.BudgetPeriod != "month" || k.ExpiresAt == nil ||
			!k.ExpiresAt.Equal(time.Date(2099, 1, 31, 18, 0, 0, 0, time.UTC)) || k.Notes != "edited" || k.Models != "" {
			t.Fatalf("after edit: %+v", k)
		}
		if resp, _ := b.post("/dashboard/client-keys/"+id, url.Values{"_csrf": {csrf}, "rpm": {"-1"}}); resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("a negative rpm: %d, want 400", resp.StatusCode)
		}
		contains(t, "list", b.page("/dashboard/client-keys?saved=1"), "settings were saved", "2099-01-31 18:00", "/ $2.50 a month", "/ 9,000")

		// Revoke: asked first, then refused by the proxy.
		if resp, _ := b.post("/dashboard/client-keys/"+id+"/revoke", url.Values{"confirm": {"yes"}}); resp.StatusCode != http.StatusForbidden {
			t.Fatalf("revoke without CSRF: %d", resp.StatusCode)
		}
		resp, body = b.post("/dashboard/client-keys/"+id+"/revoke", url.Values{"_csrf": {csrf}})
		if resp.StatusCode != http.StatusOK || !strings.Contains(body, "Revoke this client key?") {
			t.Fatalf("revoke asks first: %d\n%s", resp.StatusCode, body)
		}
		if k, _ := px.App.Store.ClientKeyByID(t.Context(), id); k.RevokedAt != nil {
			t.Fatal("revoked without confirmation")
		}
		if resp, _ := b.post("/dashboard/client-keys/"+id+"/revoke", url.Values{"_csrf": {csrf}, "confirm": {"yes"}}); resp.StatusCode != http.StatusSeeOther {
			t.Fatalf("revoke: %d", resp.StatusCode)
		}
		apptest.Eventually(t, 5*time.Second, func() bool { return call(t, px, key, chatMini).status == 401 }, "the revoked key is refused")
		contains(t, "list", b.page("/dashboard/client-keys?revoked=1"), "was revoked", `class="state ck-revoked"`)

		// A model without a price is flagged on the overview.
		if r := call(t, px, apptest.ClientKey, `{"model":"mystery-model-x","messages":[{"role":"user","content":"Hi"}]}`); r.status != 200 {
			t.Fatalf("unpriced call: %d", r.status)
		}
		apptest.Eventually(t, 15*time.Second, func() bool {
			return strings.Contains(b.page("/dashboard?window=1h"), "mystery-model-x")
		}, "the unpriced model on the overview")
		contains(t, "overview", b.page("/dashboard?window=1h"), "Models with no price", "incomplete: 1 unpriced model")

		// The key was shown once: on no page since, in no log line, in no row.
		for _, path := range []string{"/dashboard/client-keys", "/dashboard/client-keys/" + id, "/dashboard", "/dashboard/requests"} {
			if strings.Contains(b.page(path), key) {
				t.Fatalf("%s shows the key", path)
			}
		}
		if strings.Contains(px.Logs.String(), key) {
			t.Fatal("the key is in the proxy's log")
		}
		var dump []string
		px.App.Store.DB().Raw(`SELECT id || name || digest || hint || models || notes FROM client_keys
			UNION ALL SELECT client || path || error || idempotency_key || user_agent FROM request_logs`).Scan(&dump)
		if len(dump) == 0 || strings.Contains(strings.Join(dump, "\n"), key) {
			t.Fatal(fmt.Sprintf("the key is in the database (%d rows)", len(dump)))
		}
	})
}
