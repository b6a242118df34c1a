package dashboard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/filesystem"
	"github.com/gofiber/template/html/v2"
	"github.com/valyala/fasthttp"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/static"
	"github.com/openai-idempotent-proxy/proxy/views"
)

// The dashboard's queries, each a small interface models.Store implements,
// so page tests can hand in fakes.
type (
	// Stats reads the roll-ups behind the overview.
	Stats interface {
		Traffic(ctx context.Context, from, to time.Time, step time.Duration) ([]models.TrafficPoint, error)
		Totals(ctx context.Context, from, to time.Time) (models.Totals, error)
		TopModels(ctx context.Context, from, to time.Time, limit int) ([]models.TopEntry, error)
		TopClients(ctx context.Context, from, to time.Time, limit int) ([]models.TopEntry, error)
	}
	// Logs reads the request log.
	Logs interface {
		ListRequestLogs(ctx context.Context, f models.LogFilter) (models.LogPage, error)
		RequestLogByID(ctx context.Context, id int64) (models.RequestLog, error)
	}
	// Keys reads and expires idempotency records.
	Keys interface {
		ListIdempotency(ctx context.Context, f models.IdempotencyFilter) (models.IdempotencyPage, error)
		IdempotencyByID(ctx context.Context, id string) (models.IdempotencyRecord, error)
		DeleteIdempotency(ctx context.Context, id string) error
	}
)

// Config is what the dashboard needs from the app.
type Config struct {
	// Password is ADMIN_PASSWORD; only its SHA-256 digest is kept.
	Password string
	// Open is true when the proxy runs without client keys.
	Open bool
	// TrustForwardedProto is true when X-Forwarded-Proto comes only from
	// trusted proxies (TRUSTED_PROXIES is set, so Fiber checks the peer).
	TrustForwardedProto bool
	// IdempotencyTTL is shown next to the keys.
	IdempotencyTTL time.Duration

	Stats Stats
	Logs  Logs
	Keys  Keys
	// ClientKeys manages client keys; EnvKeyNames are the PROXY_API_KEYS
	// names, listed read-only.
	ClientKeys  ClientKeys
	EnvKeyNames []string
	// Prices flags models without a price on the overview; nil: none.
	Prices *models.Prices
	DB     handlers.Pinger
	// Dropped counts request log records lost (LogWriter.Dropped); nil: none.
	Dropped func() uint64
	// KeyRejectedAt is when the upstream last refused OPENAI_API_KEY
	// (Metrics.UpstreamKeyRejectedAt); nil or zero: not since start.
	KeyRejectedAt func() time.Time
	// Auth is the sign-in state shared by replicas (the signing secret,
	// signed-out sessions, failed sign-ins); nil keeps it in this process.
	Auth Auth
	// Now is the clock expirations are measured against; nil: time.Now.
	Now    func() time.Time
	Logger *slog.Logger
}

// Handler serves the admin pages under /dashboard. Handlers are methods,
// one file per page or action; Mount (the end of this file) holds the
// route table, mounted from app/routes.go.
type Handler struct {
	cfg    Config
	digest handlers.SecretDigest // of the admin password

	signerMu sync.Mutex
	signer   *signer // nil until the shared secret has been read
}

// Dashboard paths and names shared by handlers and templates.
const (
	Prefix            = "/dashboard"
	dashboardLogin    = Prefix + "/login"
	sessionCookie     = "dashboard_session"
	csrfField         = "_csrf"
	sessionLifetime   = 12 * time.Hour
	loginAttempts     = 5
	loginWindow       = time.Minute
	dashboardPageSize = 50
)

// New builds the handlers. Nothing touches the database yet: the
// signing secret is read on first use.
func New(cfg Config) *Handler {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.KeyRejectedAt == nil {
		cfg.KeyRejectedAt = func() time.Time { return time.Time{} }
	}
	if cfg.Dropped == nil {
		cfg.Dropped = func() uint64 { return 0 }
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Auth == nil {
		cfg.Auth = newMemoryAuth(cfg.Now)
	}
	digest := handlers.DigestSecret([]byte(cfg.Password))
	cfg.Password = "" // keep only the digest
	return &Handler{cfg: cfg, digest: digest}
}

// Prepare reads the signing secret now, so the first page view does not
// create it; an error is only logged, and the read is retried on use.
func (h *Handler) Prepare(ctx context.Context) {
	_, _ = h.keys(ctx)
}

// SecureHeaders sets the headers every dashboard response carries and marks
// cookies Secure when the request came over HTTPS.
func (h *Handler) SecureHeaders(c *fiber.Ctx) error {
	c.Set("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; "+
		"form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	c.Set("X-Content-Type-Options", "nosniff")
	c.Set("X-Frame-Options", "DENY")
	// same-origin keeps the Referer that Fiber's CSRF check demands on HTTPS.
	c.Set("Referrer-Policy", "same-origin")
	c.Set("Cache-Control", "no-store")
	err := c.Next()
	if h.isHTTPS(c) {
		markCookiesSecure(&c.Response().Header)
	}
	return err
}

// isHTTPS reports whether the browser talks to us over TLS: directly, or
// through a trusted reverse proxy that says so. Without TRUSTED_PROXIES
// anyone could send X-Forwarded-Proto, so it is ignored.
func (h *Handler) isHTTPS(c *fiber.Ctx) bool {
	return c.Context().IsTLS() || (h.cfg.TrustForwardedProto && c.IsProxyTrusted() && c.Protocol() == "https")
}

func markCookiesSecure(h *fasthttp.ResponseHeader) {
	var cookies []*fasthttp.Cookie
	for _, v := range h.Cookies() {
		ck := fasthttp.AcquireCookie()
		if err := ck.ParseBytes(v); err != nil {
			fasthttp.ReleaseCookie(ck)
			continue
		}
		ck.SetSecure(true)
		cookies = append(cookies, ck)
	}
	for _, ck := range cookies {
		h.SetCookie(ck)
		fasthttp.ReleaseCookie(ck)
	}
}

// layout is what base.html needs on every page.
type layout struct {
	Title    string
	Nav      string // "overview", "requests", "keys" or "clientkeys": the current section
	CSRF     string // token for the page's POST forms
	SignedIn bool
	Open     bool  // the proxy runs without client keys
	DBDown   bool  // the database did not answer
	Dropped  int64 // request log records lost
	// KeyRejected is when the upstream last refused OPENAI_API_KEY, if
	// within the last hour: every call fails while it does.
	KeyRejected time.Time
	Refresh     int // seconds; 0: no auto-refresh
}

// page fills the layout of a signed-in page; nav names its section.
func (h *Handler) page(c *fiber.Ctx, title, nav string) layout {
	dbDown, _ := c.Locals(dbDownLocal).(bool)
	return layout{
		Title: title, Nav: nav, CSRF: h.csrfOf(c), SignedIn: c.Locals(sessionLocal) != nil, DBDown: dbDown,
		Open: h.cfg.Open, Dropped: int64(min(h.cfg.Dropped(), math.MaxInt64)), KeyRejected: h.recentKeyRejection(),
	}
}

// recentKeyRejection is the time of the upstream's last refusal of
// OPENAI_API_KEY if it is under an hour old.
func (h *Handler) recentKeyRejection() time.Time {
	at := h.cfg.KeyRejectedAt()
	if at.IsZero() || h.cfg.Now().Sub(at) > time.Hour {
		return time.Time{}
	}
	return at
}

// DegradeWhenDatabaseDown turns a page's internal error into a 503 page
// with the "database unreachable" banner when the database does not
// answer, instead of a bare 500: an admin opening the dashboard during an
// outage must learn why nothing shows.
func (h *Handler) DegradeWhenDatabaseDown(c *fiber.Ctx) error {
	err := c.Next()
	if err == nil || ErrorStatus(err) != http.StatusInternalServerError {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), authTimeout)
	defer cancel()
	if h.cfg.DB.Ping(ctx) == nil {
		return err
	}
	h.cfg.Logger.Warn("dashboard: database unreachable", "path", c.Path(), "error", err.Error())
	p := errorPage{layout: h.page(c, "Database unreachable", ""), Status: http.StatusServiceUnavailable,
		Message: "This page needs the database, which does not answer. It shows again once the database is back."}
	p.DBDown = true
	return render(c, http.StatusServiceUnavailable, "error", p)
}

// render writes a page inside the base layout.
func render(c *fiber.Ctx, status int, name string, data any) error {
	c.Status(status)
	return c.Render("dashboard/"+name, data, "layouts/base")
}

// errorPage is the data of dashboard/error.
type errorPage struct {
	layout
	Status  int
	Message string
}

// RenderError answers err as an HTML page; app's ErrorHandler
// calls it for /dashboard paths. Only fiber.Error messages below 500 are
// shown, and never an internal error's text.
func RenderError(c *fiber.Ctx, err error) error {
	status, msg := errorAnswer(err)
	c.Set("Cache-Control", "no-store")
	c.Set("X-Content-Type-Options", "nosniff")
	title := http.StatusText(status)
	if title == "" {
		title = "Error"
	}
	return render(c, status, "error", errorPage{layout: layout{Title: title}, Status: status, Message: msg})
}

// ErrorStatus is the status RenderError answers err with.
func ErrorStatus(err error) int {
	status, _ := errorAnswer(err)
	return status
}

// errorAnswer is the one mapping of a dashboard error to the status and
// the message a page shows.
func errorAnswer(err error) (int, string) {
	status, msg := http.StatusInternalServerError, "Something went wrong on our side. The details are in the proxy's log."
	var fe *fiber.Error
	switch {
	case errors.As(err, &fe) && fe.Code < 500:
		status, msg = fe.Code, fe.Message
		if fe.Code == http.StatusNotFound {
			// Fiber's own says "Cannot GET /path"; ours says what to do.
			msg = "There is no such page, or what it showed no longer exists."
		}
	case errors.As(err, &fe):
		status = fe.Code
	case errors.Is(err, models.ErrNotFound):
		status, msg = http.StatusNotFound, "It no longer exists: it may have expired or been deleted."
	case errors.Is(err, models.ErrKeyRevoked):
		status, msg = http.StatusConflict, "A revoked key cannot change; create a new key."
	case errors.Is(err, models.ErrInvalidFilter):
		status, msg = http.StatusBadRequest, "The address holds a filter or page position that is not valid."
	}
	return status, msg
}

// queryTimeout bounds the database work of one page.
const queryTimeout = 10 * time.Second

// withQueryTimeout gives the handlers after it a context that ends after d
// (c.UserContext), cancelled once they return.
func withQueryTimeout(d time.Duration) fiber.Handler {
	return func(c *fiber.Ctx) error {
		ctx, cancel := context.WithTimeout(c.UserContext(), d)
		defer cancel()
		c.SetUserContext(ctx)
		return c.Next()
	}
}

// IsPath reports whether path belongs to the dashboard.
func IsPath(path string) bool {
	return path == Prefix || strings.HasPrefix(path, Prefix+"/")
}

// NewViews builds the template engine over the embedded views.
// Functions are added before Load, and Load runs now: a template that does
// not parse fails start-up instead of a page nobody has opened yet.
func NewViews() (*html.Engine, error) {
	engine := html.NewFileSystem(http.FS(views.FS), ".html")
	engine.AddFuncMap(Funcs())
	if err := engine.Load(); err != nil {
		return nil, fmt.Errorf("dashboard templates: %w", err)
	}
	return engine, nil
}

// Mount registers the dashboard's route table under Prefix.
//
// Every route runs SecureHeaders (CSP, no-store, Secure cookies over
// HTTPS) and DegradeWhenDatabaseDown. Pages need a session (RequireLogin
// redirects to the login form otherwise); every signed-in POST passes
// CheckCSRF. The sign-in POST checks its own token and the throttle.
func (h *Handler) Mount(r fiber.Router) {
	d := r.Group(Prefix, h.SecureHeaders, h.DegradeWhenDatabaseDown)
	d.Use("/static", filesystem.New(filesystem.Config{Root: http.FS(static.FS), MaxAge: 24 * 60 * 60}))

	d.Get("/login", h.LoginForm)
	d.Post("/login", h.Login)
	d.Post("/logout", h.RequireLogin, h.CheckCSRF, h.Logout)

	q := withQueryTimeout(queryTimeout)
	d.Get("/", h.RequireLogin, q, h.Overview)
	d.Get("/requests", h.RequireLogin, h.Requests) // its own, shorter bound: listTimeout
	d.Get("/requests/:id", h.RequireLogin, q, h.Request)
	d.Get("/keys", h.RequireLogin, q, h.Keys)
	d.Get("/keys/:id", h.RequireLogin, q, h.Key)
	d.Post("/keys/:id/delete", h.RequireLogin, h.CheckCSRF, q, h.DeleteKey)
	d.Get("/client-keys", h.RequireLogin, q, h.ClientKeyList)
	d.Get("/client-keys/new", h.RequireLogin, h.NewClientKeyForm)
	d.Post("/client-keys", h.RequireLogin, h.CheckCSRF, q, h.CreateClientKey)
	d.Get("/client-keys/:id", h.RequireLogin, q, h.EditClientKeyForm)
	d.Post("/client-keys/:id", h.RequireLogin, h.CheckCSRF, q, h.UpdateClientKey)
	d.Post("/client-keys/:id/revoke", h.RequireLogin, h.CheckCSRF, q, h.RevokeClientKey)
}
