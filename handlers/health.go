package handlers

import (
	"context"

	"github.com/gofiber/fiber/v2"
)

// Pinger reports whether the database answers.
type Pinger interface {
	Ping(ctx context.Context) error
}

// Healthz answers 200 while the process serves requests.
func Healthz(c *fiber.Ctx) error {
	return c.JSON(fiber.Map{"status": "ok"})
}

// Readyz answers 200 when the database is reachable, 503 otherwise.
func Readyz(db Pinger) fiber.Handler {
	return func(c *fiber.Ctx) error {
		if err := db.Ping(c.UserContext()); err != nil {
			return c.Status(fiber.StatusServiceUnavailable).JSON(fiber.Map{"status": "unavailable", "database": "unreachable"})
		}
		return c.JSON(fiber.Map{"status": "ok", "database": "ok"})
	}
}
