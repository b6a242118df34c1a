package app

import (
	"errors"
	"log/slog"
	"net/http"
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/handlers/dashboard"
)

// errorHandler maps every error a handler returns to a response, once:
// OpenAI's JSON error shape (the SDKs parse it), or an HTML page under
// /dashboard when the dashboard is enabled, with internal details logged,
// never sent.
func errorHandler(logger *slog.Logger) fiber.ErrorHandler {
	return func(c *fiber.Ctx, err error) error {
		if dashboard.IsPath(c.Path()) && c.App().Config().Views != nil {
			return dashboardError(c, err, logger)
		}
		apiErr := handlers.AsAPIError(err)
		var fe *fiber.Error
		if apiErr.Status >= 500 && !errors.As(err, &fe) {
			logger.Error("request failed", "method", c.Method(), "path", strings.Clone(c.Path()), "error", err.Error())
		}
		return handlers.WriteAPIError(c, err)
	}
}

// dashboardError answers a dashboard error with a rendered page, or plain
// text if even that fails.
func dashboardError(c *fiber.Ctx, err error, logger *slog.Logger) error {
	status := dashboard.ErrorStatus(err)
	var fe *fiber.Error
	if status >= 500 && !errors.As(err, &fe) {
		logger.Error("dashboard request failed", "method", c.Method(), "path", strings.Clone(c.Path()), "error", err.Error())
	}
	if rerr := dashboard.RenderError(c, err); rerr != nil {
		logger.Error("dashboard error page failed", "error", rerr.Error())
		c.Set(fiber.HeaderContentType, fiber.MIMETextPlainCharsetUTF8)
		return c.Status(status).SendString(http.StatusText(status))
	}
	return nil
}
