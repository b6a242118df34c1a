package proxy

import (
	"testing"

	"github.com/gofiber/fiber/v2"
	"github.com/valyala/fasthttp"
)

// TestRecordIDsStayTheSame pins how a key's record id and a request's
// fingerprint are derived. Both are stored: if either changed, a retry sent
// across an upgrade would miss its record and run again, or get a 422.
func TestRecordIDsStayTheSame(t *testing.T) {
	// sha256 of "acme\x00order-42\x00", as sha256sum gives it.
	if got, want := scopeID("acme", "order-42"), "fa123ac558cfd3082014250bc45c6f704382ea5eb9842bab84dc35adb9f3a778"; got != want {
		t.Errorf("scopeID = %s, want %s", got, want)
	}
	app := fiber.New()
	var rc fasthttp.RequestCtx
	rc.Request.Header.SetMethod(fiber.MethodPost)
	rc.Request.SetRequestURI("/v1/chat/completions?x=1")
	rc.Request.Header.SetContentType("application/json")
	rc.Request.SetBodyString(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`)
	c := app.AcquireCtx(&rc)
	defer app.ReleaseCtx(c)
	got, cleanup, err := requestFingerprint(c, "/chat/completions")
	defer cleanup()
	if err != nil {
		t.Fatal(err)
	}
	if want := "a8cca9f0c516aa2ef155a3a98823c5107b0462af04d357ff60726a79d3354672"; got != want {
		t.Errorf("requestFingerprint = %s, want %s", got, want)
	}
	if tok := randomToken(); len(tok) != 32 || tok == randomToken() {
		t.Errorf("randomToken = %q: want 32 hex digits, different each time", tok)
	}
}
