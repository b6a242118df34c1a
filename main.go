// Command proxy is a self-hosted OpenAI API proxy that keeps the upstream key
// secret, executes each Idempotency-Key exactly once and logs every request.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/openai-idempotent-proxy/proxy/app"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := app.Run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
