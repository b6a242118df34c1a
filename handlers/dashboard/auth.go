package dashboard

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
)

// Auth is the sign-in state every replica shares; models.Store
// implements it on the database.
//
// Sessions and CSRF tokens are signed, not stored: a session cookie
// carries its id and expiry under an HMAC, and a form's CSRF token is an
// HMAC of the session id. So an anonymous visitor costs no database row,
// and a signed-in admin keeps seeing pages (with the "database
// unreachable" banner) while the database is down.
type Auth interface {
	// DashboardSecret returns the signing secret, the same on every replica.
	DashboardSecret(ctx context.Context) ([]byte, error)
	// RevokeSession records a signed-out session until it would expire.
	RevokeSession(ctx context.Context, id string, until time.Time) error
	SessionRevoked(ctx context.Context, id string) (bool, error)
	// CountLoginFailure atomically counts one attempt from key in a fixed
	// window and returns the count so far and when the window ends.
	CountLoginFailure(ctx context.Context, key string, window time.Duration) (int64, time.Time, error)
	// ForgiveLoginFailure takes one counted attempt back.
	ForgiveLoginFailure(ctx context.Context, key string) error
}

// Names of the cookies and locals of signing in.
const (
	loginCookie   = "dashboard_login" // the anonymous login form's CSRF nonce
	sessionLocal  = "dashboard.session"
	dbDownLocal   = "dashboard.dbdown"
	loginFormLife = 2 * time.Hour
	authTimeout   = 3 * time.Second
)

// errSecretUnavailable: the signing secret could not be read, so no
// cookie or token can be made or checked.
var errSecretUnavailable = errors.New("dashboard: signing secret unavailable")

// signer holds the keys derived from the shared secret, one per use, so a
// token made for one purpose never verifies as another.
type signer struct{ session, csrf []byte }

func newSigner(secret []byte) *signer {
	derive := func(purpose string) []byte {
		m := hmac.New(sha256.New, secret)
		m.Write([]byte(purpose))
		return m.Sum(nil)
	}
	return &signer{session: derive("dashboard session v1"), csrf: derive("dashboard csrf v1")}
}

func mac(key []byte, parts ...string) string {
	m := hmac.New(sha256.New, key)
	for _, p := range parts {
		m.Write([]byte(p))
		m.Write([]byte{0})
	}
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

func equalMAC(a, b string) bool { return hmac.Equal([]byte(a), []byte(b)) }

// keys returns the signer, reading the secret once. Until a read
// succeeds every call tries again, so a replica started during a database
// outage signs people in once the database is back.
func (h *Handler) keys(ctx context.Context) (*signer, error) {
	h.signerMu.Lock()
	defer h.signerMu.Unlock()
	if h.signer != nil {
		return h.signer, nil
	}
	secret, err := h.cfg.Auth.DashboardSecret(ctx)
	if err != nil {
		h.cfg.Logger.Warn("dashboard: signing secret unavailable", "error", err.Error())
		return nil, errSecretUnavailable
	}
	h.signer = newSigner(secret)
	return h.signer, nil
}

// session is a signed-in admin's session, as its cookie says.
type session struct {
	ID      string
	Expires time.Time
}

// encode is the cookie value: id.expiry-unix.mac.
func (s *signer) encode(sess session) string {
	body := sess.ID + "." + strconv.FormatInt(sess.Expires.Unix(), 10)
	return body + "." + mac(s.session, body)
}

// decode checks a cookie value's signature and expiry.
func (s *signer) decode(v string, now time.Time) (session, bool) {
	id, rest, ok1 := strings.Cut(v, ".")
	exp, sig, ok2 := strings.Cut(rest, ".")
	if !ok1 || !ok2 || !equalMAC(sig, mac(s.session, id+"."+exp)) {
		return session{}, false
	}
	unix, err := strconv.ParseInt(exp, 10, 64)
	if err != nil || !now.Before(time.Unix(unix, 0)) {
		return session{}, false
	}
	return session{ID: id, Expires: time.Unix(unix, 0)}, true
}

// csrfToken is the token of a signed-in session's forms: bound to its id,
// so it changes at every sign-in and is worthless in another browser.
func (s *signer) csrfToken(sess session) string { return mac(s.csrf, "session", sess.ID) }

// loginToken is the login form's token, bound to the nonce in the
// browser's login cookie (a signed double submit: no server-side state).
func (s *signer) loginToken(cookie string) string { return mac(s.csrf, "login", cookie) }

func randomID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go 1.24)
	return hex.EncodeToString(b)
}

// currentSession returns the request's valid session, or nil. dbDown is
// true when the database could not be asked: then a well-signed session is
// trusted without its revocation check, so the pages can say what is wrong.
func (h *Handler) currentSession(c *fiber.Ctx) (sess *session, dbDown bool) {
	v := c.Cookies(sessionCookie)
	if v == "" {
		return nil, false
	}
	ctx, cancel := context.WithTimeout(c.UserContext(), authTimeout)
	defer cancel()
	keys, err := h.keys(ctx)
	if err != nil {
		return nil, true
	}
	s, ok := keys.decode(v, h.cfg.Now())
	if !ok {
		return nil, false
	}
	revoked, err := h.cfg.Auth.SessionRevoked(ctx, s.ID)
	if err != nil {
		h.cfg.Logger.Warn("dashboard: session check failed; trusting its signature", "error", err.Error())
		return &s, true
	}
	if revoked {
		return nil, false
	}
	return &s, false
}

// RequireLogin lets signed-in requests through and sends everyone else to
// the login form, remembering where they were going.
func (h *Handler) RequireLogin(c *fiber.Ctx) error {
	sess, dbDown := h.currentSession(c)
	if dbDown {
		c.Locals(dbDownLocal, true)
	}
	if sess != nil {
		c.Locals(sessionLocal, sess)
		return c.Next()
	}
	target := dashboardLogin
	if c.Method() == fiber.MethodGet && c.OriginalURL() != Prefix {
		target += "?next=" + url.QueryEscape(c.OriginalURL())
	}
	return c.Redirect(target, http.StatusSeeOther)
}

// postValue reads a field of a url-encoded form body only: a token in the
// query string would end up in logs and Referer headers.
func postValue(c *fiber.Ctx, name string) string {
	return string(c.Request().PostArgs().Peek(name))
}

// CheckCSRF refuses a signed-in POST whose _csrf field is not its
// session's token. It runs after RequireLogin.
func (h *Handler) CheckCSRF(c *fiber.Ctx) error {
	sess, _ := c.Locals(sessionLocal).(*session)
	keys := h.loadedKeys()
	if sess == nil || keys == nil || !equalMAC(postValue(c, csrfField), keys.csrfToken(*sess)) {
		return h.csrfFailed(c)
	}
	return c.Next()
}

// loadedKeys returns the signer if the secret has been read, else nil.
func (h *Handler) loadedKeys() *signer {
	h.signerMu.Lock()
	defer h.signerMu.Unlock()
	return h.signer
}

// csrfOf is the token for the page's forms, "" when signed out.
func (h *Handler) csrfOf(c *fiber.Ctx) string {
	sess, _ := c.Locals(sessionLocal).(*session)
	keys := h.loadedKeys()
	if sess == nil || keys == nil {
		return ""
	}
	return keys.csrfToken(*sess)
}

// loginFormToken returns the login form's token, setting a fresh login
// cookie unless the browser holds one good for a while yet.
func (h *Handler) loginFormToken(c *fiber.Ctx, keys *signer) string {
	now := h.cfg.Now()
	v := c.Cookies(loginCookie)
	if exp, ok := loginCookieExpiry(v); !ok || exp.Sub(now) < loginFormLife/2 {
		exp := now.Add(loginFormLife)
		v = randomID() + "." + strconv.FormatInt(exp.Unix(), 10)
		h.setCookie(c, loginCookie, v, exp, fiber.CookieSameSiteStrictMode)
	}
	return keys.loginToken(v)
}

// loginTokenValid checks a sign-in POST's token against its login cookie.
func (h *Handler) loginTokenValid(c *fiber.Ctx, keys *signer) bool {
	v := c.Cookies(loginCookie)
	exp, ok := loginCookieExpiry(v)
	return ok && h.cfg.Now().Before(exp) && equalMAC(postValue(c, csrfField), keys.loginToken(v))
}

func loginCookieExpiry(v string) (time.Time, bool) {
	_, exp, ok := strings.Cut(v, ".")
	unix, err := strconv.ParseInt(exp, 10, 64)
	if !ok || err != nil {
		return time.Time{}, false
	}
	return time.Unix(unix, 0), true
}

// setCookie sets a dashboard cookie that lasts until expires; an expiry
// in the past deletes it. Max-Age, not Expires: the browser counts it on
// its own clock. SecureHeaders adds Secure over HTTPS.
func (h *Handler) setCookie(c *fiber.Ctx, name, value string, expires time.Time, sameSite string) {
	maxAge := int(expires.Sub(h.cfg.Now()) / time.Second)
	if maxAge <= 0 {
		maxAge = -1 // sent as Max-Age=0: delete now
	}
	c.Cookie(&fiber.Cookie{
		Name: name, Value: value, Path: Prefix, MaxAge: maxAge,
		HTTPOnly: true, SameSite: sameSite,
	})
}
