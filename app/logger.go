package app

import (
	"io"
	"log/slog"

	"github.com/openai-idempotent-proxy/proxy/handlers/scrub"
)

// NewLogger builds the process logger. As a last line of defence it
// redacts any configured secret that might reach a log attribute.
func NewLogger(cfg Config, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	mask := scrub.New(cfg.Secrets()...)
	opts := &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Value.Kind() != slog.KindString {
				return a
			}
			return slog.String(a.Key, mask.String(a.Value.String()))
		},
	}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
