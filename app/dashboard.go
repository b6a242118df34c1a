package app

import (
	"context"
	"time"

	"github.com/openai-idempotent-proxy/proxy/handlers/dashboard"
)

// mountDashboard registers the admin pages under /dashboard (the page
// table is dashboard.Handler.Mount); without ADMIN_PASSWORD none exist. The
// sign-in state (signing secret, signed-out sessions, failed sign-ins)
// lives in the database, shared by every replica.
func (a *App) mountDashboard() {
	h := dashboard.New(dashboard.Config{
		Password:            a.cfg.AdminPassword,
		Open:                a.cfg.OpenProxy(),
		TrustForwardedProto: len(a.cfg.TrustedProxies) > 0,
		IdempotencyTTL:      a.cfg.IdempotencyTTL,
		Stats:               a.Store,
		Logs:                a.Store,
		Keys:                a.Store,
		ClientKeys:          a.Store,
		EnvKeyNames:         envKeyNames(a.cfg.ClientKeys),
		Prices:              a.cfg.Prices,
		DB:                  a.Store,
		Auth:                a.Store,
		Dropped:             a.Logs.Dropped,
		KeyRejectedAt:       a.Metrics.UpstreamKeyRejectedAt,
		Now:                 a.Store.Now,
		Logger:              a.logger,
	})
	// The secret is created at start-up rather than by the first visitor;
	// if the database is down now, the first page that needs it retries.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	h.Prepare(ctx)
	h.Mount(a.Fiber)
}
