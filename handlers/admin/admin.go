// Package admin is the JSON admin API under /admin/v1, for automation:
// managed client keys are created, listed, changed and revoked here. It is
// enabled by ADMIN_API_TOKEN and answers errors in OpenAI's shape.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// Prefix is where the API is mounted.
const Prefix = "/admin/v1"

// Store is what the API needs from the database; models.Store implements it.
type Store interface {
	CreateClientKey(ctx context.Context, name string, l models.ClientKeyLimits) (models.ClientKey, string, error)
	ListClientKeys(ctx context.Context) ([]models.ClientKey, error)
	ClientKeyByID(ctx context.Context, id string) (models.ClientKey, error)
	UpdateClientKey(ctx context.Context, id string, l models.ClientKeyLimits) (models.ClientKey, error)
	RevokeClientKey(ctx context.Context, id string) (models.ClientKey, error)
}

// API serves /admin/v1.
type API struct {
	store    Store
	digest   handlers.SecretDigest // of "Bearer <token>"
	envNames []string              // PROXY_API_KEYS names: listed, read-only, not reusable
	now      func() time.Time
	logger   *slog.Logger
}

// New builds the API over token (ADMIN_API_TOKEN, already validated).
func New(store Store, token string, envNames []string, now func() time.Time, logger *slog.Logger) *API {
	if now == nil {
		now = time.Now
	}
	return &API{store: store, digest: handlers.DigestSecret([]byte("Bearer " + token)), envNames: envNames, now: now, logger: logger}
}

// Mount registers the routes; every one checks the token first.
func (a *API) Mount(r fiber.Router) {
	g := r.Group(Prefix, a.requireToken)
	g.Post("/keys", a.create)
	g.Get("/keys", a.list)
	g.Get("/keys/:id", a.get)
	g.Patch("/keys/:id", a.update)
	g.Delete("/keys/:id", a.revoke)
	g.All("/*", func(c *fiber.Ctx) error {
		return fail(c, http.StatusNotFound, "not_found", "Unknown admin API route.")
	})
}

// requireToken checks the token in constant time (handlers.SecretDigest).
func (a *API) requireToken(c *fiber.Ctx) error {
	c.Set("Cache-Control", "no-store")
	if !a.digest.Matches(c.Request().Header.Peek("Authorization")) {
		return handlers.WriteAPIError(c, &handlers.APIError{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_admin_token",
			Message: "Send the admin API token as 'Authorization: Bearer <ADMIN_API_TOKEN>'."})
	}
	return c.Next()
}

func fail(c *fiber.Ctx, status int, code, msg string) error {
	return handlers.WriteAPIError(c, &handlers.APIError{Status: status, Type: "invalid_request_error", Code: code, Message: msg})
}

// keyJSON is a key as the API shows it: never the key, only its hint.
type keyJSON struct {
	ID           string     `json:"id"`
	Object       string     `json:"object"`
	Source       string     `json:"source"` // "managed" or "environment"
	Name         string     `json:"name"`
	Key          string     `json:"key,omitempty"` // only in the answer to POST
	Hint         string     `json:"hint,omitempty"`
	State        string     `json:"state"`
	CreatedAt    *time.Time `json:"created_at,omitempty"`
	ExpiresAt    *time.Time `json:"expires_at"`
	RevokedAt    *time.Time `json:"revoked_at"`
	Models       []string   `json:"models"`
	RPM          int64      `json:"rpm"`
	TPM          int64      `json:"tpm"`
	BudgetUSD    float64    `json:"budget_usd"`
	BudgetPeriod string     `json:"budget_period,omitempty"`
	Notes        string     `json:"notes"`
}

func (a *API) toJSON(k models.ClientKey) keyJSON {
	created := k.CreatedAt
	models := k.AllowedModels()
	if models == nil {
		models = []string{}
	}
	return keyJSON{ID: k.ID, Object: "client_key", Source: "managed", Name: k.Name, Hint: "…" + k.Hint, State: k.State(a.now()),
		CreatedAt: &created, ExpiresAt: k.ExpiresAt, RevokedAt: k.RevokedAt, Models: models, RPM: k.RPM, TPM: k.TPM,
		BudgetUSD: float64(k.BudgetMicros) / 1e6, BudgetPeriod: k.BudgetPeriod, Notes: k.Notes}
}

// keyInput is the body of POST and PATCH. Pointers tell "absent" (PATCH
// keeps the value) from a value; expires_at null clears the expiry.
type keyInput struct {
	Name         *string         `json:"name"`
	ExpiresAt    json.RawMessage `json:"expires_at"`
	RPM          *int64          `json:"rpm"`
	TPM          *int64          `json:"tpm"`
	BudgetUSD    *float64        `json:"budget_usd"`
	BudgetPeriod *string         `json:"budget_period"`
	Models       *[]string       `json:"models"`
	Notes        *string         `json:"notes"`
}

// apply lays the input over l.
func (in *keyInput) apply(l *models.ClientKeyLimits) error {
	if len(in.ExpiresAt) > 0 {
		if string(in.ExpiresAt) == "null" {
			l.ExpiresAt = nil
		} else {
			var s string
			if err := json.Unmarshal(in.ExpiresAt, &s); err != nil {
				return errors.New("expires_at must be an RFC 3339 time or null")
			}
			t, err := time.Parse(time.RFC3339, s)
			if err != nil {
				return errors.New("expires_at must be an RFC 3339 time such as 2030-01-02T15:04:05Z")
			}
			l.ExpiresAt = &t
		}
	}
	if in.RPM != nil {
		l.RPM = *in.RPM
	}
	if in.TPM != nil {
		l.TPM = *in.TPM
	}
	if in.BudgetUSD != nil {
		if *in.BudgetUSD < 0 || *in.BudgetUSD > 1e6 {
			return errors.New("budget_usd must be from 0 (none) to 1000000")
		}
		l.BudgetMicros = models.USDToMicros(*in.BudgetUSD)
	}
	if in.BudgetPeriod != nil {
		l.BudgetPeriod = *in.BudgetPeriod
	}
	if in.Models != nil {
		l.Models = *in.Models
	}
	if in.Notes != nil {
		l.Notes = *in.Notes
	}
	return l.Validate()
}

func limitsOf(k models.ClientKey) models.ClientKeyLimits {
	return models.ClientKeyLimits{ExpiresAt: k.ExpiresAt, Models: k.AllowedModels(), RPM: k.RPM, TPM: k.TPM,
		BudgetMicros: k.BudgetMicros, BudgetPeriod: k.BudgetPeriod, Notes: k.Notes}
}

func parseInput(c *fiber.Ctx) (*keyInput, error) {
	var in keyInput
	dec := json.NewDecoder(strings.NewReader(string(c.Body())))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&in); err != nil {
		return nil, errors.New("the body must be a JSON object with the fields name, expires_at, rpm, tpm, budget_usd, budget_period, models, notes")
	}
	return &in, nil
}

func (a *API) isEnvName(name string) bool {
	for _, n := range a.envNames {
		if strings.EqualFold(n, name) {
			return true
		}
	}
	return false
}

func (a *API) create(c *fiber.Ctx) error {
	in, err := parseInput(c)
	if err != nil {
		return fail(c, http.StatusBadRequest, "invalid_request_body", err.Error())
	}
	name := ""
	if in.Name != nil {
		name = strings.TrimSpace(*in.Name)
	}
	if err := models.ValidateClientKeyName(name); err != nil {
		return fail(c, http.StatusBadRequest, "invalid_name", publicText(err))
	}
	if a.isEnvName(name) {
		return fail(c, http.StatusConflict, "name_taken", "A key from PROXY_API_KEYS has this name.")
	}
	var l models.ClientKeyLimits
	if err := in.apply(&l); err != nil {
		return fail(c, http.StatusBadRequest, "invalid_limits", publicText(err))
	}
	k, key, err := a.store.CreateClientKey(c.UserContext(), name, l)
	if errors.Is(err, models.ErrNameTaken) {
		return fail(c, http.StatusConflict, "name_taken", "A client key with this name exists.")
	}
	if err != nil {
		return err
	}
	a.logger.Info("client key created", "id", k.ID, "name", k.Name, "via", "admin_api")
	out := a.toJSON(k)
	out.Key = key
	return c.Status(http.StatusCreated).JSON(out)
}

func (a *API) list(c *fiber.Ctx) error {
	keys, err := a.store.ListClientKeys(c.UserContext())
	if err != nil {
		return err
	}
	data := make([]keyJSON, 0, len(keys)+len(a.envNames))
	for _, n := range a.envNames {
		data = append(data, keyJSON{Object: "client_key", Source: "environment", Name: n, State: "active", Models: []string{}})
	}
	for _, k := range keys {
		data = append(data, a.toJSON(k))
	}
	return c.JSON(fiber.Map{"object": "list", "data": data})
}

func (a *API) get(c *fiber.Ctx) error {
	k, err := a.store.ClientKeyByID(c.UserContext(), c.Params("id"))
	if err != nil {
		return a.keyError(c, err)
	}
	return c.JSON(a.toJSON(k))
}

func (a *API) update(c *fiber.Ctx) error {
	in, err := parseInput(c)
	if err != nil {
		return fail(c, http.StatusBadRequest, "invalid_request_body", err.Error())
	}
	if in.Name != nil {
		return fail(c, http.StatusBadRequest, "invalid_limits", "A key's name cannot change: it names the key in the request log.")
	}
	id := c.Params("id")
	k, err := a.store.ClientKeyByID(c.UserContext(), id)
	if err != nil {
		return a.keyError(c, err)
	}
	if k.RevokedAt != nil {
		return a.keyError(c, models.ErrKeyRevoked)
	}
	l := limitsOf(k)
	if err := in.apply(&l); err != nil {
		return fail(c, http.StatusBadRequest, "invalid_limits", publicText(err))
	}
	k, err = a.store.UpdateClientKey(c.UserContext(), id, l)
	if err != nil {
		return a.keyError(c, err)
	}
	a.logger.Info("client key changed", "id", k.ID, "name", k.Name, "via", "admin_api")
	return c.JSON(a.toJSON(k))
}

func (a *API) revoke(c *fiber.Ctx) error {
	k, err := a.store.RevokeClientKey(c.UserContext(), c.Params("id"))
	if err != nil {
		return a.keyError(c, err)
	}
	a.logger.Info("client key revoked", "id", k.ID, "name", k.Name, "via", "admin_api")
	return c.JSON(a.toJSON(k))
}

func (a *API) keyError(c *fiber.Ctx, err error) error {
	switch {
	case errors.Is(err, models.ErrNotFound):
		return fail(c, http.StatusNotFound, "not_found", "No client key has this id.")
	case errors.Is(err, models.ErrKeyRevoked):
		return fail(c, http.StatusConflict, "key_revoked", "A revoked key cannot change; create a new key.")
	}
	return err
}

// publicText drops the package prefix of a validation error.
func publicText(err error) string {
	return strings.TrimPrefix(err.Error(), models.ErrInvalidClientKey.Error()+": ")
}
