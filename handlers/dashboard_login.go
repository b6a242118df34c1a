package handlers

import (
	"crypto/sha256"
	"crypto/subtle"
	"net/http"
	"net/url"
	"strings"

	"github.com/gofiber/fiber/v2"
)

// loginPage is the data of dashboard/login.
type loginPage struct {
	layout
	Next     string // where to go after signing in
	Error    string
	Notice   string
	HideForm bool // throttled, or no CSRF token to put in the form
}

// LoginForm shows the sign-in form (GET /dashboard/login).
func (h *Dashboard) LoginForm(c *fiber.Ctx) error {
	sess, err := h.sessions.Get(c)
	if err != nil {
		return err
	}
	next := safeNext(c.Query("next"))
	if ok, _ := sess.Get(sessionAdminKey).(bool); ok {
		return c.Redirect(next, http.StatusSeeOther)
	}
	p := h.loginPage(c, next)
	if c.Query("bye") != "" {
		p.Notice = "You are signed out."
	}
	return render(c, http.StatusOK, "login", p)
}

func (h *Dashboard) loginPage(c *fiber.Ctx, next string) loginPage {
	token, _ := c.Locals(csrfLocal).(string)
	return loginPage{layout: layout{Title: "Sign in", CSRF: token, Open: h.cfg.Open}, Next: next}
}

// Login checks the password (POST /dashboard/login). LoginThrottle and CSRF
// run before it. A wrong password answers 401, which the throttle counts.
func (h *Dashboard) Login(c *fiber.Ctx) error {
	next := safeNext(c.FormValue("next"))
	// Comparing fixed-size digests in constant time reveals neither the
	// password nor its length through timing.
	got := sha256.Sum256([]byte(c.FormValue("password")))
	if subtle.ConstantTimeCompare(got[:], h.digest[:]) != 1 {
		h.cfg.Logger.Warn("dashboard sign-in failed", "ip", strings.Clone(c.IP()))
		p := h.loginPage(c, next)
		p.Error = "That password is not correct."
		return render(c, http.StatusUnauthorized, "login", p)
	}
	sess, err := h.sessions.Get(c)
	if err != nil {
		return err
	}
	// A new session id on sign-in: an id planted before (session
	// fixation) never becomes an authenticated one.
	if err := sess.Regenerate(); err != nil {
		return err
	}
	sess.Set(sessionAdminKey, true)
	sess.Set(sessionSinceKey, h.cfg.Now().Unix())
	if err := sess.Save(); err != nil {
		return err
	}
	h.cfg.Logger.Info("dashboard sign-in", "ip", strings.Clone(c.IP()))
	return c.Redirect(next, http.StatusSeeOther)
}

// loginThrottled answers a sign-in attempt over the limit: 429 and a page
// saying when to try again (the limiter has set Retry-After).
func (h *Dashboard) loginThrottled(c *fiber.Ctx) error {
	h.cfg.Logger.Warn("dashboard sign-in throttled", "ip", strings.Clone(c.IP()))
	p := h.loginPage(c, safeNext(c.FormValue("next")))
	p.HideForm = true
	p.Error = "Too many failed sign-in attempts from your address. Wait a minute, then try again."
	if s := c.GetRespHeader(fiber.HeaderRetryAfter); s != "" {
		p.Error = "Too many failed sign-in attempts from your address. Try again in " + s + " seconds."
	}
	return render(c, http.StatusTooManyRequests, "login", p)
}

// csrfFailed answers a POST whose CSRF token is missing, forged or
// expired: 403. On the login form, whose token may simply have expired, the
// page links to a fresh form.
func (h *Dashboard) csrfFailed(c *fiber.Ctx, _ error) error {
	if c.Path() == dashboardLogin {
		p := h.loginPage(c, safeNext(c.FormValue("next")))
		p.HideForm = true
		p.Error = "The sign-in form had expired or was not sent from this site. Reload it and sign in again."
		return render(c, http.StatusForbidden, "login", p)
	}
	return fiber.NewError(http.StatusForbidden, "The form's security token was missing or had expired, so nothing was changed. Go back, reload the page and try again.")
}

// safeNext keeps a post-login destination only when it is a dashboard path
// on this host, so the login form can never redirect elsewhere.
func safeNext(next string) string {
	u, err := url.Parse(next)
	if next == "" || err != nil || u.Scheme != "" || u.Host != "" || u.User != nil ||
		strings.ContainsAny(next, "\\\r\n\t") || strings.HasPrefix(next, "//") ||
		!IsDashboardPath(u.Path) || u.Path == dashboardLogin {
		return DashboardPrefix
	}
	return next
}
