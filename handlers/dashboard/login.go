package dashboard

import (
	"context"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

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

// LoginForm shows the sign-in form (GET /dashboard/login). It writes
// nothing to the database: its CSRF token is signed against a nonce in a
// cookie.
func (h *Handler) LoginForm(c *fiber.Ctx) error {
	next := safeNext(c.Query("next"))
	if sess, _ := h.currentSession(c); sess != nil {
		return c.Redirect(next, http.StatusSeeOther)
	}
	p := loginPage{layout: layout{Title: "Sign in"}, Next: next}
	ctx, cancel := context.WithTimeout(c.UserContext(), authTimeout)
	defer cancel()
	keys, err := h.keys(ctx)
	if err != nil {
		return h.loginUnavailable(c, p)
	}
	p.CSRF = h.loginFormToken(c, keys)
	switch c.Query("bye") {
	case "1":
		p.Notice = "You are signed out."
	case "local":
		p.Notice = "You are signed out in this browser. The database did not answer, so the session could not be ended on the server; it expires on its own within " + formatTTL(sessionLifetime) + "."
	}
	return render(c, http.StatusOK, "login", p)
}

// loginUnavailable answers a sign-in that cannot proceed without the
// database (the signing secret or the failed-attempt count): 503, saying so.
func (h *Handler) loginUnavailable(c *fiber.Ctx, p loginPage) error {
	p.DBDown = true
	p.Error = "The proxy's database is unreachable, so signing in is not possible right now. Try again once it is back."
	p.HideForm = true
	return render(c, http.StatusServiceUnavailable, "login", p)
}

// Login checks the password (POST /dashboard/login): the form's token
// first, then the throttle, then the password.
func (h *Handler) Login(c *fiber.Ctx) error {
	next := safeNext(postValue(c, "next"))
	p := loginPage{layout: layout{Title: "Sign in"}, Next: next}
	ctx, cancel := context.WithTimeout(c.UserContext(), authTimeout)
	defer cancel()
	keys, err := h.keys(ctx)
	if err != nil {
		return h.loginUnavailable(c, p)
	}
	if !h.loginTokenValid(c, keys) {
		return h.csrfFailed(c)
	}
	p.CSRF = h.loginFormToken(c, keys)
	ip := strings.Clone(c.IP()) // c.IP() is the peer, or X-Forwarded-For only from TRUSTED_PROXIES
	// The attempt is counted before the password is checked, in one atomic
	// statement, so parallel attempts on any number of replicas check at
	// most loginAttempts passwords per window.
	n, windowEnds, err := h.cfg.Auth.CountLoginFailure(ctx, ip, loginWindow)
	if err != nil {
		h.cfg.Logger.Warn("dashboard: sign-in refused, failed attempts cannot be counted", "ip", ip, "error", err.Error())
		return h.loginUnavailable(c, p)
	}
	if n > loginAttempts {
		return h.loginThrottled(c, p, ip, windowEnds)
	}
	if !h.digest.Matches([]byte(postValue(c, "password"))) {
		h.cfg.Logger.Warn("dashboard sign-in failed", "ip", ip)
		p.Error = "That password is not correct."
		return render(c, http.StatusUnauthorized, "login", p)
	}
	if err := h.cfg.Auth.ForgiveLoginFailure(ctx, ip); err != nil {
		h.cfg.Logger.Warn("dashboard: could not uncount a successful sign-in", "ip", ip, "error", err.Error())
	}
	// A new session id on every sign-in: no id planted before (session
	// fixation) becomes an authenticated one, and the CSRF token, bound to
	// the id, rotates with it. The login form's nonce is spent.
	sess := session{ID: randomID(), Expires: h.cfg.Now().Add(sessionLifetime)}
	h.setCookie(c, sessionCookie, keys.encode(sess), sess.Expires, fiber.CookieSameSiteLaxMode)
	h.setCookie(c, loginCookie, "", time.Unix(0, 0), fiber.CookieSameSiteStrictMode)
	h.cfg.Logger.Info("dashboard sign-in", "ip", ip)
	return c.Redirect(next, http.StatusSeeOther)
}

// loginThrottled answers a sign-in attempt over the limit: 429, a
// Retry-After, and a page saying when to try again.
func (h *Handler) loginThrottled(c *fiber.Ctx, p loginPage, ip string, windowEnds time.Time) error {
	h.cfg.Logger.Warn("dashboard sign-in throttled", "ip", ip)
	wait := max(1, int(math.Ceil(windowEnds.Sub(h.cfg.Now()).Seconds())))
	c.Set(fiber.HeaderRetryAfter, strconv.Itoa(wait))
	p.HideForm = true
	p.Error = "Too many failed sign-in attempts from your address. Try again in " + strconv.Itoa(wait) + " seconds."
	return render(c, http.StatusTooManyRequests, "login", p)
}

// csrfFailed answers a POST whose CSRF token is missing, forged or
// expired: 403. On the login form, whose token may simply have expired, the
// page links to a fresh form.
func (h *Handler) csrfFailed(c *fiber.Ctx) error {
	if c.Path() == dashboardLogin {
		p := loginPage{layout: layout{Title: "Sign in"}, Next: safeNext(postValue(c, "next")), HideForm: true}
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
		!IsPath(u.Path) || u.Path == dashboardLogin {
		return Prefix
	}
	return next
}
