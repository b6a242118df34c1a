package app

import (
	"strings"

	"github.com/gofiber/fiber/v2/middleware/cors"
	"github.com/gofiber/fiber/v2/middleware/recover"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/handlers/admin"
	"github.com/openai-idempotent-proxy/proxy/handlers/proxy"
)

// envKeyNames are the names of PROXY_API_KEYS, shown read-only beside the
// managed keys.
func envKeyNames(keys []handlers.ClientKey) []string {
	names := make([]string, len(keys))
	for i, k := range keys {
		names[i] = k.Name
	}
	return names
}

// Headers a browser app may send to /v1: the auth and content headers, the
// idempotency key, OpenAI's own, and those the official SDKs add.
var corsAllowHeaders = []string{
	"Authorization", "Content-Type", "Accept", "Idempotency-Key",
	"OpenAI-Organization", "OpenAI-Project", "OpenAI-Beta",
	"X-Stainless-Arch", "X-Stainless-Lang", "X-Stainless-OS", "X-Stainless-Package-Version",
	"X-Stainless-Runtime", "X-Stainless-Runtime-Version", "X-Stainless-Retry-Count",
	"X-Stainless-Timeout", "X-Stainless-Async", "X-Stainless-Helper-Method",
	"X-Stainless-Poll-Helper", "X-Stainless-Custom-Poll-Interval",
}

// Response headers a browser app may read.
var corsExposeHeaders = []string{
	"X-Request-Id", "OpenAI-Processing-Ms", "OpenAI-Version", "OpenAI-Organization",
	"X-Ratelimit-Limit-Requests", "X-Ratelimit-Limit-Tokens",
	"X-Ratelimit-Remaining-Requests", "X-Ratelimit-Remaining-Tokens",
	"X-Ratelimit-Reset-Requests", "X-Ratelimit-Reset-Tokens",
	"Retry-After", proxy.ReplayedHeader,
}

// routes is the whole URL table.
func (a *App) routes() {
	f := a.Fiber
	f.Use(recover.New())
	f.Get("/healthz", handlers.Healthz)
	f.Get("/readyz", handlers.Readyz(a.Store))
	f.Get("/metrics", a.Metrics.Handler(a.cfg.MetricsToken))

	if a.cfg.AdminPassword != "" {
		a.mountDashboard()
	}
	if a.cfg.AdminAPIToken != "" {
		admin.New(a.Store, a.cfg.AdminAPIToken, envKeyNames(a.cfg.ClientKeys), a.Store.Now, a.logger).Mount(f)
	}

	v1 := f.Group("/v1")
	if len(a.cfg.CORSAllowedOrigins) > 0 {
		// Closed by default: without origins no CORS headers are sent, so
		// browsers refuse cross-origin calls and no web page a user visits
		// can spend the key. Preflights are answered here, never forwarded.
		v1.Use(cors.New(cors.Config{
			AllowOrigins:  strings.Join(a.cfg.CORSAllowedOrigins, ","),
			AllowMethods:  "GET,POST,PUT,PATCH,DELETE,OPTIONS",
			AllowHeaders:  strings.Join(corsAllowHeaders, ","),
			ExposeHeaders: strings.Join(corsExposeHeaders, ","),
			MaxAge:        600,
		}))
	}
	// WebSocket upgrades (Realtime, Responses WebSocket mode) first; every
	// other request falls through to the HTTP proxy.
	v1.Get("/*", a.WS.Handle)
	v1.All("/*", a.Proxy.Handle)
}
