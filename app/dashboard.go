package app

import (
	"fmt"
	"net/http"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/filesystem"
	"github.com/gofiber/template/html/v2"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/static"
	"github.com/openai-idempotent-proxy/proxy/views"
)

// The dashboard's sessions, CSRF tokens and login throttle live in the
// database, shared by every replica.
var _ fiber.Storage = (*models.KVStorage)(nil)

// newDashboardViews builds the template engine over the embedded views.
// Functions are added before Load, and Load runs now: a template that does
// not parse fails start-up instead of a page nobody has opened yet.
func newDashboardViews() (*html.Engine, error) {
	engine := html.NewFileSystem(http.FS(views.FS), ".html")
	engine.AddFuncMap(handlers.DashboardFuncs())
	if err := engine.Load(); err != nil {
		return nil, fmt.Errorf("dashboard templates: %w", err)
	}
	return engine, nil
}

// mountDashboard registers the admin pages under /dashboard. Only routes
// registered here exist; without ADMIN_PASSWORD none are.
//
// Every route runs SecureHeaders (CSP, no-store, Secure cookies over
// HTTPS). Pages need a session (RequireLogin redirects to the login form
// otherwise) and pass CSRF, which issues the token on GET and checks it on
// every POST. Sign-in attempts pass the throttle first.
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
	d := a.Fiber.Group(handlers.DashboardPrefix, h.SecureHeaders)
	d.Use("/static", filesystem.New(filesystem.Config{Root: http.FS(static.FS), MaxAge: 24 * 60 * 60}))

	d.Get("/login", h.CSRF, h.LoginForm)
	d.Post("/login", h.LoginThrottle, h.CSRF, h.Login)
	d.Post("/logout", h.RequireLogin, h.CSRF, h.Logout)

	d.Get("/", h.RequireLogin, h.CSRF, h.Overview)
	d.Get("/requests", h.RequireLogin, h.CSRF, h.Requests)
	d.Get("/requests/:id", h.RequireLogin, h.CSRF, h.Request)
	d.Get("/keys", h.RequireLogin, h.CSRF, h.Keys)
	d.Get("/keys/:id", h.RequireLogin, h.CSRF, h.Key)
	d.Post("/keys/:id/delete", h.RequireLogin, h.CSRF, h.DeleteKey)
}
