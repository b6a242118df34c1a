package dashboard

import (
	"context"
	"net/http"
	"time"

	"github.com/gofiber/fiber/v2"
)

// Logout ends the session (POST /dashboard/logout): in this browser by
// deleting its cookie, everywhere by recording the session as revoked.
func (h *Handler) Logout(c *fiber.Ctx) error {
	sess, _ := c.Locals(sessionLocal).(*session)
	h.setCookie(c, sessionCookie, "", time.Unix(0, 0), fiber.CookieSameSiteLaxMode)
	ctx, cancel := context.WithTimeout(c.UserContext(), authTimeout)
	defer cancel()
	if err := h.cfg.Auth.RevokeSession(ctx, sess.ID, sess.Expires); err != nil {
		h.cfg.Logger.Warn("dashboard: sign-out not recorded; the session stays valid until it expires", "error", err.Error())
		return c.Redirect(dashboardLogin+"?bye=local", http.StatusSeeOther)
	}
	return c.Redirect(dashboardLogin+"?bye=1", http.StatusSeeOther)
}
