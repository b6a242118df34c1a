package dashboard

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// ClientKeys manages the proxy's client keys: the same model functions the
// admin API calls, so a key is created, changed and revoked one way.
type ClientKeys interface {
	CreateClientKey(ctx context.Context, name string, l models.ClientKeyLimits) (models.ClientKey, string, error)
	ListClientKeys(ctx context.Context) ([]models.ClientKey, error)
	ClientKeyByID(ctx context.Context, id string) (models.ClientKey, error)
	UpdateClientKey(ctx context.Context, id string, l models.ClientKeyLimits) (models.ClientKey, error)
	RevokeClientKey(ctx context.Context, id string) (models.ClientKey, error)
	Budgets(ctx context.Context, keys []models.ClientKey, now time.Time) (map[string]models.BudgetState, error)
	UsageByClient(ctx context.Context, from, to time.Time) (map[string]models.ClientUsage, error)
}

// clientKeysPage is the data of dashboard/client_keys.
type clientKeysPage struct {
	layout
	Rows          []clientKeyRow
	Notice, Error string
}

// clientKeyRow is one key as the list shows it: never the key, its hint.
type clientKeyRow struct {
	ID, Name, Hint, State string
	Env                   bool // from PROXY_API_KEYS: read-only
	Expires               *time.Time
	Today, Period         models.ClientUsage
	PeriodName            string // "today" or "this month"
	Limits                []limitMeter
	Models, Notes         string
}

// limitMeter is one limit and how much of it is used, 0..100.
type limitMeter struct {
	Name, Used, Limit string
	Pct               float64
	Class             string // "", "warn" at 80 %, "full" at 100 %
}

func meter(name string, used, limit int64, format func(int64) string) limitMeter {
	m := limitMeter{Name: name, Used: format(used), Limit: format(limit)}
	if limit > 0 {
		m.Pct = min(100, float64(used)*100/float64(limit))
	}
	switch {
	case m.Pct >= 100:
		m.Class = "full"
	case m.Pct >= 80:
		m.Class = "warn"
	}
	return m
}

func countText(n int64) string { return strconv.FormatInt(n, 10) }

// ClientKeyList shows every client key with its state, use and limits
// (GET /dashboard/client-keys).
func (h *Handler) ClientKeyList(c *fiber.Ctx) error {
	p := clientKeysPage{layout: h.page(c, "Client keys", "clientkeys")}
	switch {
	case c.Query("saved") != "":
		p.Notice = "The key's settings were saved. Every replica applies them within seconds."
	case c.Query("revoked") != "":
		p.Notice = "The key was revoked. Every replica refuses it within seconds."
	}
	ctx := c.UserContext() // bounded by withQueryTimeout
	keys, err := h.cfg.ClientKeys.ListClientKeys(ctx)
	if err != nil {
		return err
	}
	now := h.cfg.Now().UTC()
	day, month := models.PeriodStart(models.PeriodDay, now), models.PeriodStart(models.PeriodMonth, now)
	today, err := h.cfg.ClientKeys.UsageByClient(ctx, day, now.Add(time.Minute))
	if err != nil {
		return err
	}
	thisMonth, err := h.cfg.ClientKeys.UsageByClient(ctx, month, now.Add(time.Minute))
	if err != nil {
		return err
	}
	// The current and the previous minute: what the per-minute limits see.
	lastMinute, err := h.cfg.ClientKeys.UsageByClient(ctx, now.Truncate(time.Minute).Add(-time.Minute), now.Add(time.Minute))
	if err != nil {
		return err
	}
	budgets, err := h.cfg.ClientKeys.Budgets(ctx, keys, now)
	if err != nil {
		return err
	}
	for _, name := range h.cfg.EnvKeyNames {
		p.Rows = append(p.Rows, clientKeyRow{Name: name, State: "active", Env: true, Today: today[name], Period: today[name], PeriodName: "today"})
	}
	for i := range keys {
		k := &keys[i]
		row := clientKeyRow{ID: k.ID, Name: k.Name, Hint: "…" + k.Hint, State: k.State(now), Expires: k.ExpiresAt,
			Today: today[k.Name], Period: today[k.Name], PeriodName: "today", Models: strings.Join(k.AllowedModels(), ", "), Notes: k.Notes}
		if k.BudgetPeriod == models.PeriodMonth {
			row.Period, row.PeriodName = thisMonth[k.Name], "this month"
		}
		if k.RPM > 0 {
			row.Limits = append(row.Limits, meter("rpm", lastMinute[k.Name].Requests, k.RPM, humanize.Comma))
		}
		if k.TPM > 0 {
			row.Limits = append(row.Limits, meter("tpm", lastMinute[k.Name].Tokens, k.TPM, humanize.Comma))
		}
		if k.BudgetMicros > 0 {
			b := budgets[k.ID]
			m := meter("budget", b.SpentMicros+b.ReservedMicros, k.BudgetMicros, formatUSD)
			m.Limit += " a " + k.BudgetPeriod
			row.Limits = append(row.Limits, m)
		}
		p.Rows = append(p.Rows, row)
	}
	return render(c, http.StatusOK, "client_keys", p)
}

// clientKeyForm is the data of dashboard/client_key_form: the create form,
// or the edit form of one key (ID set).
type clientKeyForm struct {
	layout
	Revoked                                                bool // shown read-only
	ID, Hint, State                                        string
	Name, Expires, RPM, TPM, Budget, Period, Models, Notes string
	Notice, Error                                          string
}

const expiresLayout = "2006-01-02T15:04"

func formOf(k models.ClientKey, now time.Time) clientKeyForm {
	f := clientKeyForm{ID: k.ID, Hint: "…" + k.Hint, State: k.State(now), Revoked: k.RevokedAt != nil, Name: k.Name, Period: k.BudgetPeriod,
		Models: strings.Join(k.AllowedModels(), ", "), Notes: k.Notes}
	if k.ExpiresAt != nil {
		f.Expires = k.ExpiresAt.UTC().Format(expiresLayout)
	}
	if k.RPM > 0 {
		f.RPM = countText(k.RPM)
	}
	if k.TPM > 0 {
		f.TPM = countText(k.TPM)
	}
	if k.BudgetMicros > 0 {
		f.Budget = strconv.FormatFloat(float64(k.BudgetMicros)/1e6, 'f', -1, 64)
	}
	return f
}

// readForm reads the posted form; limits is nil when a field is not valid,
// and Error then says which.
func (h *Handler) readForm(c *fiber.Ctx, f *clientKeyForm) *models.ClientKeyLimits {
	f.Name = strings.TrimSpace(postValue(c, "name"))
	f.Expires, f.RPM, f.TPM = strings.TrimSpace(postValue(c, "expires")), strings.TrimSpace(postValue(c, "rpm")), strings.TrimSpace(postValue(c, "tpm"))
	f.Budget, f.Period = strings.TrimSpace(postValue(c, "budget_usd")), postValue(c, "budget_period")
	f.Models, f.Notes = postValue(c, "models"), strings.TrimSpace(postValue(c, "notes"))
	var l models.ClientKeyLimits
	if f.Expires != "" {
		t, err := time.Parse(expiresLayout, f.Expires)
		if err != nil {
			t, err = time.Parse(time.DateOnly, f.Expires)
		}
		if err != nil {
			f.Error = "The expiry must be a date and time such as 2030-01-31T18:00 (UTC), or empty for none."
			return nil
		}
		l.ExpiresAt = &t
	}
	whole := func(s, name string, dst *int64) bool {
		if s == "" {
			return true
		}
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			f.Error = "The " + name + " limit must be a whole number, or empty for none."
			return false
		}
		*dst = n
		return true
	}
	if !whole(f.RPM, "requests per minute", &l.RPM) || !whole(f.TPM, "tokens per minute", &l.TPM) {
		return nil
	}
	if f.Budget != "" {
		usd, err := strconv.ParseFloat(f.Budget, 64)
		if err != nil || usd < 0 || usd > 1e6 {
			f.Error = "The budget must be an amount in USD from 0 to 1000000, or empty for none."
			return nil
		}
		l.BudgetMicros = models.USDToMicros(usd)
	}
	l.BudgetPeriod = f.Period
	if l.BudgetMicros == 0 {
		l.BudgetPeriod = ""
	}
	l.Models = strings.FieldsFunc(f.Models, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\r' || r == '\t' })
	l.Notes = f.Notes
	if err := l.Validate(); err != nil {
		f.Error = publicText(err)
		return nil
	}
	return &l
}

func publicText(err error) string {
	s := strings.TrimPrefix(err.Error(), models.ErrInvalidClientKey.Error()+": ")
	return strings.ToUpper(s[:1]) + s[1:] + "."
}

// NewClientKeyForm shows the empty create form (GET /dashboard/client-keys/new).
func (h *Handler) NewClientKeyForm(c *fiber.Ctx) error {
	f := clientKeyForm{layout: h.page(c, "New client key", "clientkeys"), Period: models.PeriodMonth}
	return render(c, http.StatusOK, "client_key_form", f)
}

// clientKeyCreated is the data of dashboard/client_key_created: the only
// page that ever shows a key.
type clientKeyCreated struct {
	layout
	Row clientKeyForm
	Key string
}

// CreateClientKey creates a key and shows it once (POST /dashboard/client-keys).
// The answer is the page itself, not a redirect: nothing keeps the key to
// show it again, and the page is no-store.
func (h *Handler) CreateClientKey(c *fiber.Ctx) error {
	f := clientKeyForm{layout: h.page(c, "New client key", "clientkeys")}
	l := h.readForm(c, &f)
	if l != nil {
		if err := models.ValidateClientKeyName(f.Name); err != nil {
			f.Error, l = publicText(err), nil
		} else if h.isEnvName(f.Name) {
			f.Error, l = "A key from PROXY_API_KEYS has this name; choose another.", nil
		}
	}
	if l == nil {
		return render(c, http.StatusBadRequest, "client_key_form", f)
	}
	k, key, err := h.cfg.ClientKeys.CreateClientKey(c.UserContext(), f.Name, *l)
	if errors.Is(err, models.ErrNameTaken) {
		f.Error = "A client key with this name exists; choose another."
		return render(c, http.StatusConflict, "client_key_form", f)
	}
	if err != nil {
		return err
	}
	h.cfg.Logger.Info("client key created", "id", k.ID, "name", k.Name, "via", "dashboard")
	c.Set("Cache-Control", "no-store")
	return render(c, http.StatusCreated, "client_key_created",
		clientKeyCreated{layout: h.page(c, "Client key created", "clientkeys"), Row: formOf(k, h.cfg.Now()), Key: key})
}

func (h *Handler) isEnvName(name string) bool {
	for _, n := range h.cfg.EnvKeyNames {
		if strings.EqualFold(n, name) {
			return true
		}
	}
	return false
}

// EditClientKeyForm shows a key's settings (GET /dashboard/client-keys/:id).
func (h *Handler) EditClientKeyForm(c *fiber.Ctx) error {
	k, err := h.cfg.ClientKeys.ClientKeyByID(c.UserContext(), c.Params("id"))
	if err != nil {
		return err
	}
	f := formOf(k, h.cfg.Now())
	f.layout = h.page(c, "Client key "+k.Name, "clientkeys")
	if f.Revoked {
		f.Notice = "Revoked " + k.RevokedAt.UTC().Format("2006-01-02 15:04 UTC") + ". A revoked key cannot change; create a new key."
	}
	return render(c, http.StatusOK, "client_key_form", f)
}

// UpdateClientKey saves a key's limits, expiry and notes
// (POST /dashboard/client-keys/:id); its name never changes.
func (h *Handler) UpdateClientKey(c *fiber.Ctx) error {
	ctx := c.UserContext()
	k, err := h.cfg.ClientKeys.ClientKeyByID(ctx, c.Params("id"))
	if err != nil {
		return err
	}
	if k.RevokedAt != nil {
		return models.ErrKeyRevoked
	}
	f := formOf(k, h.cfg.Now())
	f.layout = h.page(c, "Client key "+k.Name, "clientkeys")
	l := h.readForm(c, &f)
	f.Name = k.Name
	if l == nil {
		return render(c, http.StatusBadRequest, "client_key_form", f)
	}
	if k, err = h.cfg.ClientKeys.UpdateClientKey(ctx, k.ID, *l); err != nil {
		return err
	}
	h.cfg.Logger.Info("client key changed", "id", k.ID, "name", k.Name, "via", "dashboard")
	return c.Redirect(Prefix+"/client-keys?saved=1", http.StatusSeeOther)
}

// RevokeClientKey revokes a key (POST /dashboard/client-keys/:id/revoke).
// Without confirm=yes it only asks; the confirmation form posts again.
func (h *Handler) RevokeClientKey(c *fiber.Ctx) error {
	ctx := c.UserContext()
	k, err := h.cfg.ClientKeys.ClientKeyByID(ctx, c.Params("id"))
	if err != nil {
		return err
	}
	if postValue(c, "confirm") != "yes" {
		f := formOf(k, h.cfg.Now())
		f.layout = h.page(c, "Revoke client key?", "clientkeys")
		return render(c, http.StatusOK, "client_key_revoke", f)
	}
	if k, err = h.cfg.ClientKeys.RevokeClientKey(ctx, k.ID); err != nil {
		return err
	}
	h.cfg.Logger.Info("client key revoked", "id", k.ID, "name", k.Name, "via", "dashboard")
	return c.Redirect(Prefix+"/client-keys?revoked=1", http.StatusSeeOther)
}
