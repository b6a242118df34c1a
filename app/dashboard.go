package app

import (
	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// The dashboard's sessions, CSRF tokens and login throttle live in the
// database, shared by every replica.
var _ fiber.Storage = (*models.KVStorage)(nil)

// mountDashboard registers the admin pages under /dashboard (the page
// table is Dashboard.Mount); without ADMIN_PASSWORD none exist.
func (a *App) mountDashboard() {
	h := handlers.NewDashboard(handlers.DashboardConfig{
		Password:            a.cfg.AdminPassword,
		Open:                len(a.cfg.ClientKeys) == 0,
		TrustForwardedProto: len(a.cfg.TrustedProxies) > 0,
		IdempotencyTTL:      a.cfg.IdempotencyTTL,
		Stats:               a.Store,
		Logs:                a.Store,
		Keys:                a.Store,
		DB:                  a.Store,
		Dropped:             a.Logs.Dropped,
		Storage:             func(prefix string) fiber.Storage { return a.Store.NewKVStorage(prefix) },
		Now:                 a.Store.Now,
		Logger:              a.logger,
	})
	h.Mount(a.Fiber)
}
