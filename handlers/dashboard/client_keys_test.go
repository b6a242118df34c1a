package dashboard

import (
	"context"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// fakeClientKeys keeps client keys in memory, as models.Store would.
type fakeClientKeys struct {
	mu    sync.Mutex
	keys  []models.ClientKey
	usage map[string]models.ClientUsage
}

func (f *fakeClientKeys) CreateClientKey(_ context.Context, name string, l models.ClientKeyLimits) (models.ClientKey, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, k := range f.keys {
		if k.Name == name {
			return models.ClientKey{}, "", models.ErrNameTaken
		}
	}
	key := "pxy_secretSECRETsecret1234"
	k := models.ClientKey{ID: "ck_" + name, Name: name, Digest: models.DigestKey(key), Hint: key[len(key)-4:], CreatedAt: testNow,
		ExpiresAt: l.ExpiresAt, Models: strings.Join(l.Models, ","), RPM: l.RPM, TPM: l.TPM, BudgetMicros: l.BudgetMicros, BudgetPeriod: l.BudgetPeriod, Notes: l.Notes}
	f.keys = append(f.keys, k)
	return k, key, nil
}
func (f *fakeClientKeys) ListClientKeys(context.Context) ([]models.ClientKey, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]models.ClientKey(nil), f.keys...), nil
}
func (f *fakeClientKeys) ClientKeyByID(_ context.Context, id string) (models.ClientKey, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, k := range f.keys {
		if k.ID == id {
			return k, nil
		}
	}
	return models.ClientKey{}, models.ErrNotFound
}
func (f *fakeClientKeys) UpdateClientKey(_ context.Context, id string, l models.ClientKeyLimits) (models.ClientKey, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := range f.keys {
		if k := &f.keys[i]; k.ID == id {
			k.ExpiresAt, k.Models, k.RPM, k.TPM, k.BudgetMicros, k.BudgetPeriod, k.Notes = l.ExpiresAt, strings.Join(l.Models, ","), l.RPM, l.TPM, l.BudgetMicros, l.BudgetPeriod, l.Notes
			return *k, nil
		}
	}
	return models.ClientKey{}, models.ErrNotFound
}
func (f *fakeClientKeys) RevokeClientKey(_ context.Context, id string) (models.ClientKey, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := range f.keys {
		if k := &f.keys[i]; k.ID == id {
			at := testNow
			k.RevokedAt = &at
			return *k, nil
		}
	}
	return models.ClientKey{}, models.ErrNotFound
}
func (f *fakeClientKeys) Budgets(_ context.Context, keys []models.ClientKey, _ time.Time) (map[string]models.BudgetState, error) {
	out := map[string]models.BudgetState{}
	for _, k := range keys {
		out[k.ID] = models.BudgetState{SpentMicros: f.usage[k.Name].CostMicros}
	}
	return out, nil
}
func (f *fakeClientKeys) UsageByClient(context.Context, time.Time, time.Time) (map[string]models.ClientUsage, error) {
	return f.usage, nil
}

func TestClientKeysPages(t *testing.T) {
	ck := &fakeClientKeys{usage: map[string]models.ClientUsage{"svc": {Requests: 9, Tokens: 900, CostMicros: 4_500_000}}}
	app := newTestApp(t, seededFake(t), func(c *Config) { c.ClientKeys, c.EnvKeyNames = ck, []string{"alpha"} })
	c := newClient(t, app)
	c.login()

	_, page := c.get("/dashboard/client-keys")
	wantContains(t, page, "Client keys", "alpha", "from the environment", `aria-current="page">Client keys`)
	csrf := csrfToken(t, page)
	form := url.Values{"name": {"svc"}, "rpm": {"10"}, "budget_usd": {"6"}, "budget_period": {"day"}, "models": {"gpt-4o-mini, gpt-4.1"}}

	resp, body := c.do("POST", "/dashboard/client-keys", form)
	wantStatus(t, resp, body, http.StatusForbidden)
	form.Set("_csrf", csrf)
	for _, bad := range []url.Values{{"name": {"alpha"}}, {"name": {"x"}, "rpm": {"many"}}, {"name": {"x"}, "budget_usd": {"-1"}}, {"name": {"no/slash"}}, {"name": {"x"}, "expires": {"soon"}}} {
		bad.Set("_csrf", csrf)
		resp, body = c.do("POST", "/dashboard/client-keys", bad)
		wantStatus(t, resp, body, http.StatusBadRequest)
		wantContains(t, body, `class="flash bad"`)
	}
	if len(ck.keys) != 0 {
		t.Fatalf("refused forms created keys: %+v", ck.keys)
	}

	resp, body = c.do("POST", "/dashboard/client-keys", form)
	wantStatus(t, resp, body, http.StatusCreated)
	if resp.Header.Get("Cache-Control") != "no-store" {
		t.Fatalf("Cache-Control %q", resp.Header.Get("Cache-Control"))
	}
	wantContains(t, body, "pxy_secretSECRETsecret1234", "shown only this once")
	resp, body = c.do("POST", "/dashboard/client-keys", form)
	wantStatus(t, resp, body, http.StatusConflict)

	_, page = c.get("/dashboard/client-keys")
	wantAbsent(t, page, "pxy_secret")
	// 4.5 of 6 USD today: 75 %; rpm 9 of 10: 90 %, warned.
	wantContains(t, page, "…1234", "$4.50 / $6.00 a day · 75%", `class="meter warn"`, "9 / 10 · 90%", "models: gpt-4o-mini, gpt-4.1")

	_, page = c.get("/dashboard/client-keys/ck_svc")
	wantAbsent(t, page, "pxy_secret")
	wantContains(t, page, `value="10"`, `value="6"`, `value="gpt-4o-mini, gpt-4.1"`)
	resp, body = c.do("POST", "/dashboard/client-keys/ck_svc", url.Values{"_csrf": {csrf}, "tpm": {"500"}, "expires": {"2030-01-02"}})
	wantStatus(t, resp, body, http.StatusSeeOther)
	if k := ck.keys[0]; k.RPM != 0 || k.TPM != 500 || k.BudgetMicros != 0 || k.ExpiresAt == nil || !k.ExpiresAt.Equal(time.Date(2030, 1, 2, 0, 0, 0, 0, time.UTC)) {
		t.Fatalf("after edit: %+v", k)
	}

	resp, body = c.do("POST", "/dashboard/client-keys/ck_svc/revoke", url.Values{"_csrf": {csrf}})
	wantStatus(t, resp, body, http.StatusOK)
	wantContains(t, body, "Revoke this client key?", `name="confirm" value="yes"`)
	if ck.keys[0].RevokedAt != nil {
		t.Fatal("revoked before confirmation")
	}
	resp, body = c.do("POST", "/dashboard/client-keys/ck_svc/revoke", url.Values{"_csrf": {csrf}, "confirm": {"yes"}})
	wantStatus(t, resp, body, http.StatusSeeOther)
	_, page = c.get("/dashboard/client-keys?revoked=1")
	wantContains(t, page, "was revoked", `class="state ck-revoked"`, `href="/dashboard/client-keys/ck_svc">View</a>`)
	wantAbsent(t, page, `href="/dashboard/client-keys/ck_svc">Edit</a>`)
	// A revoked key is shown read-only and cannot change.
	_, page = c.get("/dashboard/client-keys/ck_svc")
	wantContains(t, page, `<fieldset class="form-grid" disabled>`, "A revoked key cannot change")
	wantAbsent(t, page, ">Save</button>", "Revoke this key")
	resp, body = c.do("POST", "/dashboard/client-keys/ck_svc", url.Values{"_csrf": {csrf}, "rpm": {"99"}})
	wantStatus(t, resp, body, http.StatusConflict)
	wantContains(t, body, "A revoked key cannot change")
	if ck.keys[0].RPM == 99 {
		t.Fatal("a revoked key was changed")
	}
	resp, body = c.get("/dashboard/client-keys/missing")
	wantStatus(t, resp, body, http.StatusNotFound)
}

func TestOverviewSpend(t *testing.T) {
	f := seededFake(t)
	f.totals.CostMicros = 12_340_000
	f.top = []models.TopEntry{{Name: "gpt-4o-mini", Requests: 1000, Tokens: 1200, CostMicros: 2_340_000},
		{Name: "secret-finetune", Requests: 5, Tokens: 50}, {Name: "gpt-4.1", Requests: 3, CostMicros: 10_000_000}}
	app := newTestApp(t, f, func(c *Config) { c.Prices = models.DefaultPrices() })
	c := newClient(t, app)
	c.login()
	_, page := c.get("/dashboard")
	wantContains(t, page, "$12.34", "Spend over time in USD", "Top models by spend", "Models with no price", "secret-finetune", "incomplete: 1 unpriced model")
	// By spend, gpt-4.1 ($10) ranks above gpt-4o-mini ($2.34).
	spend := page[strings.Index(page, "Top models by spend"):]
	if i, j := strings.Index(spend, "gpt-4.1"), strings.Index(spend, "gpt-4o-mini"); i < 0 || j < 0 || i > j {
		t.Fatal("the spend table is not ranked by spend")
	}
	if n := len(regexp.MustCompile(`secret-finetune</a> ·`).FindAllString(page, -1)); n != 1 {
		t.Fatalf("unpriced model listed %d times", n)
	}
}
