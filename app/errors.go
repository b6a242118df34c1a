package app

import (
	"errors"
	"log/slog"
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/handlers"
)

// errorHandler maps every error a handler returns to a response, once:
// OpenAI's JSON error shape (the SDKs parse it), with internal details
// logged, never sent.
func errorHandler(logger *slog.Logger) fiber.ErrorHandler {
	return func(c *fiber.Ctx, err error) error {
		apiErr := handlers.AsAPIError(err)
		var fe *fiber.Error
		if apiErr.Status >= 500 && !errors.As(err, &fe) {
			logger.Error("request failed", "method", c.Method(), "path", strings.Clone(c.Path()), "error", err.Error())
		}
		return handlers.WriteAPIError(c, err)
	}
}
