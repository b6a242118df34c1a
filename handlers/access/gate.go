// Package access decides who may call the proxy and what they may spend:
// client keys from PROXY_API_KEYS and managed keys from the database, their
// expiry, revocation and allowed models (checked in memory), and their RPM,
// TPM and USD budget (granted atomically by the database, so every replica
// shares one limit, and handed out from memory in batches: allowance.go).
package access

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// Store is what the gate needs from the database; models.Store implements it.
type Store interface {
	ListClientKeys(ctx context.Context) ([]models.ClientKey, error)
	ClientKeysVersion(ctx context.Context) (string, error)
	ReserveBudget(ctx context.Context, keyID string, period time.Time, need, want, limit int64) (models.BudgetState, int64, error)
	SettleBudget(ctx context.Context, keyID string, period time.Time, reserved, cost int64) error
	TakeRate(ctx context.Context, keyID string, rpm, tpm, nowMs, n int64) (models.RateState, int64, error)
	SettleRate(ctx context.Context, keyID string, rpm, tokens, unused int64) error
}

// Options configure a Gate.
type Options struct {
	// Store holds the managed keys; nil: only Env keys.
	Store Store
	// Env names the PROXY_API_KEYS key whose SHA-256 digest is token (the
	// gate digests a bearer token once, for both kinds of key); its errors
	// are passed through unchanged.
	Env func(token [sha256.Size]byte) (string, error)
	// Prices turn usage into cost; nil: the embedded table.
	Prices *models.Prices
	// ReserveTokens is the output tokens a budget reservation assumes for
	// a request that names no max_tokens (BUDGET_RESERVE_TOKENS).
	ReserveTokens int64
	// Refresh is how often the key table is checked for changes; default 1s.
	Refresh time.Duration
	// Now is the clock; nil: time.Now.
	Now    func() time.Time
	Logger *slog.Logger
}

// Gate authenticates callers and applies their limits.
type Gate struct {
	opts    Options
	table   atomic.Pointer[table]
	stop    chan struct{}
	stopped sync.Once

	allowances sync.Map // key ID → *allowance: what this replica holds of its limits
	warned     atomic.Bool
}

// table is the managed keys, by SHA-256 digest, as of one refresh.
type table struct {
	version string
	keys    map[[32]byte]*Key
	byID    map[string]*Key
}

// Key is a managed key as the hot path sees it.
type Key struct {
	ID, Name     string
	expires      time.Time // zero: never
	revoked      bool
	models       map[string]bool // nil: every model
	rpm, tpm     int64
	budget       int64 // micro-dollars; 0: none
	budgetPeriod string
}

// Caller is who sent a request: an environment key, or a managed Key.
type Caller struct {
	Name string
	Key  *Key // nil for PROXY_API_KEYS
}

// New builds a gate and loads the managed keys once (a database that does
// not answer leaves the table empty until the next refresh). Start
// refreshing with Run.
func New(ctx context.Context, opts Options) *Gate {
	if opts.Prices == nil {
		opts.Prices = models.DefaultPrices()
	}
	if opts.Refresh <= 0 {
		opts.Refresh = time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Env == nil {
		opts.Env = func([sha256.Size]byte) (string, error) { return "", ErrUnknownKey }
	}
	g := &Gate{opts: opts, stop: make(chan struct{})}
	g.table.Store(&table{keys: map[[32]byte]*Key{}, byID: map[string]*Key{}})
	if opts.Store != nil {
		if err := g.refresh(ctx); err != nil {
			opts.Logger.Warn("client keys: load failed, retrying", "error", err.Error())
		}
	}
	return g
}

// Run refreshes the key table until ctx ends or Close is called: every
// Refresh it reads a version (key count and latest change) and reloads
// only when it moved, so a revocation on any replica is seen within
// Refresh plus one query. Every flushEvery it writes what requests used of
// their limits.
func (g *Gate) Run(ctx context.Context) {
	if g.opts.Store == nil {
		return
	}
	t := time.NewTicker(g.opts.Refresh)
	defer t.Stop()
	f := time.NewTicker(flushEvery)
	defer f.Stop()
	var failing bool
	for {
		select {
		case <-ctx.Done():
			return
		case <-g.stop:
			return
		case <-f.C:
			g.flush(ctx, false)
			continue
		case <-t.C:
		}
		err := g.refresh(ctx)
		if err != nil && !failing {
			g.opts.Logger.Warn("client keys: refresh failed; the last table stays in force", "error", err.Error())
		}
		failing = err != nil
	}
}

// Close stops refreshing and writes what requests used, giving back every
// batch and slice held, so other replicas can have them.
func (g *Gate) Close() {
	g.stopped.Do(func() { close(g.stop) })
	if g.opts.Store == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	g.flush(ctx, true)
}

func (g *Gate) refresh(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	v, err := g.opts.Store.ClientKeysVersion(ctx)
	if err != nil {
		return err
	}
	if cur := g.table.Load(); cur.version == v {
		return nil
	}
	rows, err := g.opts.Store.ListClientKeys(ctx)
	if err != nil {
		return err
	}
	t := &table{version: v, keys: make(map[[32]byte]*Key, len(rows)), byID: make(map[string]*Key, len(rows))}
	for _, r := range rows {
		var d [32]byte
		if b, err := hex.DecodeString(r.Digest); err != nil || len(b) != 32 {
			continue
		} else {
			copy(d[:], b)
		}
		k := &Key{ID: r.ID, Name: r.Name, revoked: r.RevokedAt != nil, rpm: r.RPM, tpm: r.TPM,
			budget: r.BudgetMicros, budgetPeriod: r.BudgetPeriod}
		if r.ExpiresAt != nil {
			k.expires = *r.ExpiresAt
		}
		if ms := r.AllowedModels(); len(ms) > 0 {
			k.models = map[string]bool{}
			for _, m := range ms {
				k.models[m] = true
			}
		}
		t.keys[d] = k
		t.byID[k.ID] = k
	}
	g.table.Store(t)
	return nil
}

// Errors of Authenticate besides those of Options.Env.
var (
	ErrUnknownKey = errors.New("access: unknown client key")
	ErrNoKey      = errors.New("missing client key")
)

// Authenticate finds the caller of an Authorization header value. A
// managed key is looked up by its digest (a map lookup reveals nothing a
// timing attacker could use: it would need SHA-256 preimages); anything
// else goes to the environment keys' constant-time check of the same
// digest. A revoked or expired managed key is refused with a *Refusal;
// a value that is not "Bearer <token>" with ErrNoKey.
func (g *Gate) Authenticate(authorization []byte) (Caller, error) {
	const prefix = "bearer "
	if len(authorization) <= len(prefix) || !bytes.EqualFold(authorization[:len(prefix)], []byte(prefix)) {
		return Caller{}, ErrNoKey
	}
	token := sha256.Sum256(authorization[len(prefix):])
	if k := g.table.Load().keys[token]; k != nil {
		switch {
		case k.revoked:
			return Caller{Name: k.Name, Key: k}, errRevoked
		case !k.expires.IsZero() && !g.opts.Now().Before(k.expires):
			return Caller{Name: k.Name, Key: k}, errExpired
		}
		return Caller{Name: k.Name, Key: k}, nil
	}
	name, err := g.opts.Env(token)
	return Caller{Name: name}, err
}

// Permits refuses a model the caller's key does not allow (403). Requests
// that name no model (GET /v1/models, files) pass.
func (c Caller) Permits(model string) error {
	if c.Key == nil || c.Key.models == nil || model == "" || c.Key.models[model] {
		return nil
	}
	return &Refusal{Status: 403, Type: "invalid_request_error", Code: "model_not_allowed",
		Message: "This proxy key may not use the model '" + model + "'."}
}

// Limited reports whether requests of this caller go through the database.
func (c Caller) Limited() bool {
	return c.Key != nil && (c.Key.rpm > 0 || c.Key.tpm > 0 || c.Key.budget > 0)
}

// CostMicros prices usage for a model; unknown models cost 0.
func (g *Gate) CostMicros(model string, u models.TokenUsage) int64 {
	return g.opts.Prices.CostMicros(model, u)
}

// Prices is the table in force.
func (g *Gate) Prices() *models.Prices { return g.opts.Prices }

// KnowsModel reports whether the price table lists model.
func (g *Gate) KnowsModel(model string) bool {
	_, ok := g.opts.Prices.Lookup(model)
	return ok
}
