// Command bareproxy is the floor of the proxy's stack: a Fiber app whose one
// route forwards /v1/* to the upstream with Fiber's proxy middleware,
// replacing the Authorization header, and does nothing else (no client key
// check, request log, metrics, idempotency or key scrubbing). TestVersusNginx
// runs it beside nginx and the proxy, so that the cost of Fiber, fasthttp
// and the Go runtime can be told from the proxy's own.
//
//	bareproxy -listen 127.0.0.1:8081 -upstream http://127.0.0.1:8082 -key sk-...
package main

import (
	"flag"
	"log"
	"strings"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/proxy"
	"github.com/valyala/fasthttp"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8081", "address to listen on")
	upstream := flag.String("upstream", "", "upstream base URL; /v1/x goes to <upstream>/x")
	key := flag.String("key", "", "API key sent upstream")
	flag.Parse()

	// As the proxy's own client: no User-Agent of its own, the path as sent.
	client := &fasthttp.Client{NoDefaultUserAgentHeader: true, DisablePathNormalizing: true}
	base := strings.TrimSuffix(*upstream, "/")
	bearer := "Bearer " + *key

	app := fiber.New(fiber.Config{DisableStartupMessage: true})
	app.All("/v1/*", func(c *fiber.Ctx) error {
		c.Request().Header.Set(fiber.HeaderAuthorization, bearer)
		return proxy.Do(c, base+strings.TrimPrefix(c.OriginalURL(), "/v1"), client)
	})
	app.Get("/healthz", func(c *fiber.Ctx) error { return c.SendString("ok") })
	log.Fatal(app.Listen(*listen))
}
