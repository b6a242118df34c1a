package handlers

import (
	"net/http"

	"github.com/gofiber/fiber/v2"
)

// Logout ends the session (POST /dashboard/logout).
func (h *Dashboard) Logout(c *fiber.Ctx) error {
	sess, err := h.sessions.Get(c)
	if err != nil {
		return err
	}
	if err := sess.Destroy(); err != nil {
		return err
	}
	return c.Redirect(dashboardLogin+"?bye=1", http.StatusSeeOther)
}
