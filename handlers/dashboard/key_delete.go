package dashboard

import (
	"net/http"

	"github.com/gofiber/fiber/v2"
)

// DeleteKey expires a key now (POST /dashboard/keys/:id/delete). Without
// confirm=yes it only shows what would be deleted and asks; the
// confirmation form posts again with it.
func (h *Handler) DeleteKey(c *fiber.Ctx) error {
	if postValue(c, "confirm") != "yes" {
		p, err := h.keyPage(c)
		if err != nil {
			return err
		}
		p.Title = "Delete key?"
		return render(c, http.StatusOK, "key_delete", p)
	}
	ctx := c.UserContext() // bounded by withQueryTimeout
	id := c.Params("id")
	if err := h.cfg.Keys.DeleteIdempotency(ctx, id); err != nil {
		return err
	}
	h.cfg.Logger.Info("dashboard: idempotency key deleted", "id", id)
	return c.Redirect(Prefix+"/keys?deleted=1", http.StatusSeeOther)
}
