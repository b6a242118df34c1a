package app

import (
	"io"
	"log/slog"
	"strings"
)

// NewLogger builds the process logger. As a last line of defence it
// redacts any configured secret that might reach a log attribute.
func NewLogger(cfg Config, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	secrets := cfg.Secrets()
	opts := &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Value.Kind() != slog.KindString {
				return a
			}
			v := a.Value.String()
			for _, s := range secrets {
				if s != "" && strings.Contains(v, s) {
					v = strings.ReplaceAll(v, s, "[redacted]")
				}
			}
			return slog.String(a.Key, v)
		},
	}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
