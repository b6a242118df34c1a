package dashboard

import (
	"net/http"
	"strconv"

	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// requestPage is the data of dashboard/request.
type requestPage struct {
	layout
	Log models.RequestLog
}

// Request shows one request log row (GET /dashboard/requests/:id).
func (h *Handler) Request(c *fiber.Ctx) error {
	id, err := strconv.ParseInt(c.Params("id"), 10, 64)
	if err != nil || id <= 0 {
		return fiber.ErrNotFound
	}
	ctx := c.UserContext() // bounded by withQueryTimeout
	rec, err := h.cfg.Logs.RequestLogByID(ctx, id)
	if err != nil {
		return err
	}
	return render(c, http.StatusOK, "request", requestPage{layout: h.page(c, "Request "+strconv.FormatInt(id, 10), "requests"), Log: rec})
}
