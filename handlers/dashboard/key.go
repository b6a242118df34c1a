package dashboard

import (
	"net/http"

	"github.com/gofiber/fiber/v2"
)

// keyPage is the data of dashboard/key and dashboard/key_delete.
type keyPage struct {
	layout
	Row      keyRow
	Headers  []header
	Response storedResponse
}

type header struct{ Name, Value string }

// Key shows one idempotency record and its stored response
// (GET /dashboard/keys/:id).
func (h *Handler) Key(c *fiber.Ctx) error {
	p, err := h.keyPage(c)
	if err != nil {
		return err
	}
	return render(c, http.StatusOK, "key", p)
}

func (h *Handler) keyPage(c *fiber.Ctx) (keyPage, error) {
	id := c.Params("id")
	if id == "" || len(id) > 128 {
		return keyPage{}, fiber.ErrNotFound
	}
	ctx := c.UserContext() // bounded by withQueryTimeout
	rec, err := h.cfg.Keys.IdempotencyByID(ctx, id)
	if err != nil {
		return keyPage{}, err
	}
	row := newKeyRow(&rec, h.cfg.Now().UTC())
	p := keyPage{layout: h.page(c, "Key "+truncateRunes(rec.IdemKey, 40), "keys"), Row: row}
	headers := parseStoredHeaders(rec.Headers)
	for _, name := range sortedKeys(headers) {
		p.Headers = append(p.Headers, header{name, headers[name]})
	}
	p.Response = decodeStoredResponse(&rec, headers)
	return p, nil
}
