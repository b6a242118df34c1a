package app_test

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/app"
	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"

	_ "github.com/jackc/pgx/v5/stdlib"
)

const (
	auditAdminPassword = "audit-admin-password-123"
	auditMetricsToken  = "audit-metrics-token-456"
)

// auditSecrets are the values that must never appear in anything the
// proxy produces.
var auditSecrets = []string{apptest.UpstreamKey, apptest.ClientKey, apptest.ClientKey2, auditAdminPassword, auditMetricsToken}

// recorder keeps every byte the proxy sent back over HTTP.
type recorder struct {
	mu  sync.Mutex
	out strings.Builder
	c   *http.Client
}

func (r *recorder) do(t *testing.T, method, target, auth string, body io.Reader, hdr map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, target, body)
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", "Bearer "+auth)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := r.c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	r.mu.Lock()
	defer r.mu.Unlock()
	path := req.URL.Path // what we asked, which may carry a secret on purpose: not the proxy's output
	for _, s := range auditSecrets {
		path = strings.ReplaceAll(path, s, "<secret>")
	}
	fmt.Fprintf(&r.out, "%s %s -> %d\n", method, path, resp.StatusCode)
	_ = resp.Header.Write(&r.out)
	r.out.Write(b)
	return resp.StatusCode, string(b)
}

var auditCSRF = regexp.MustCompile(`name="_csrf" value="([^"]+)"`)

// TestNoSecretLeaks runs a realistic session — plain, streamed, keyed,
// failing and unauthorised requests, an upstream that echoes our key, a
// panicking handler, the dashboard and the metrics page — then searches
// every byte the proxy produced: responses, its log output, and a dump of
// every database table (the raw SQLite files, too).
func TestNoSecretLeaks(t *testing.T) {
	for _, db := range []string{"sqlite", "postgres"} {
		t.Run(db, func(t *testing.T) {
			env := map[string]string{"ADMIN_PASSWORD": auditAdminPassword, "METRICS_TOKEN": auditMetricsToken, "LOG_LEVEL": "debug"}
			if db == "postgres" {
				env["DATABASE_URL"] = testdb.PostgresURL(t)
			}
			up := apptest.NewUpstream(t)
			cfg := apptest.Config(t, up.URL, env)
			px := apptest.StartWith(t, cfg, func(a *app.App) {
				a.Fiber.Get("/audit/panic", func(*fiber.Ctx) error {
					panic("handler bug while holding " + apptest.UpstreamKey + " and " + apptest.ClientKey)
				})
			})
			jar, _ := cookiejar.New(nil)
			rec := &recorder{c: &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
			runAuditSession(t, rec, px, up)

			dbText := ""
			px.Stop(t) // flushes the request log
			if db == "postgres" {
				dbText = dumpPostgres(t, cfg.DatabaseURL)
			} else {
				dbText = dumpDir(t, cfg.DataDir)
			}
			for name, text := range map[string]string{"HTTP responses": rec.out.String(), "log output": px.Logs.String(), "database": dbText} {
				if len(text) < 100 {
					t.Fatalf("%s: suspiciously little to audit (%d bytes)", name, len(text))
				}
				for _, s := range auditSecrets {
					if n := strings.Count(text, s); n > 0 {
						t.Errorf("%s contains a secret %d times (%.12s…)", name, n, s)
					}
				}
			}
			if !strings.Contains(dbText, "gpt-4o-mini") || !strings.Contains(rec.out.String(), "Idempotent-Replayed") {
				t.Fatal("the audited session did not produce what it should have")
			}
		})
	}
}

func runAuditSession(t *testing.T, rec *recorder, px *apptest.Instance, up *apptest.Upstream) {
	base := px.URL
	chat := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`
	stream := `{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}`
	js := map[string]string{"Content-Type": "application/json"}
	with := func(kv ...string) map[string]string {
		h := map[string]string{"Content-Type": "application/json"}
		for i := 0; i+1 < len(kv); i += 2 {
			h[kv[i]] = kv[i+1]
		}
		return h
	}
	rec.do(t, "POST", base+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chat), js)
	rec.do(t, "POST", base+"/v1/chat/completions", apptest.ClientKey2, strings.NewReader(stream), js)
	rec.do(t, "POST", base+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chat), with("Idempotency-Key", "audit-1"))
	rec.do(t, "POST", base+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(chat), with("Idempotency-Key", "audit-1"))
	rec.do(t, "POST", base+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(`{"other":1}`), with("Idempotency-Key", "audit-1"))
	rec.do(t, "POST", base+"/v1/chat/completions?test_status=500", apptest.ClientKey, strings.NewReader(stream), with("Idempotency-Key", "audit-2"))
	rec.do(t, "POST", base+"/v1/chat/completions?test_echo_auth=1", apptest.ClientKey, strings.NewReader(chat), js)
	rec.do(t, "POST", base+"/v1/chat/completions?test_echo_auth=1", apptest.ClientKey, strings.NewReader(chat), with("Idempotency-Key", "audit-echo"))
	// An upstream that echoes our key in headers, the request id and 200
	// bodies: JSON and SSE (the key split across reads), plain and gzip,
	// first answers and their replays.
	for _, body := range []string{chat, stream} {
		for _, gz := range []string{"", "1"} {
			echoAll := base + "/v1/chat/completions?test_echo_all=1&test_gzip=" + gz
			if status, got := rec.do(t, "POST", echoAll, apptest.ClientKey, strings.NewReader(body), js); status != 200 || !strings.Contains(got, "you sent Bearer ****") && !strings.Contains(got, `"0 Bearer ****`) {
				t.Fatalf("echo-all (gzip %q): %d %s", gz, status, got)
			}
			key := fmt.Sprintf("audit-echo-all-%d%s", len(body), gz)
			hdr := with("Idempotency-Key", key)
			first, _ := rec.do(t, "POST", echoAll, apptest.ClientKey, strings.NewReader(body), hdr)
			again, _ := rec.do(t, "POST", echoAll, apptest.ClientKey, strings.NewReader(body), hdr)
			if first != 200 || again != 200 {
				t.Fatalf("echo-all keyed (gzip %q): %d then %d", gz, first, again)
			}
		}
	}
	// Secrets a client sends where the proxy stores what it is given: as
	// the model, the Idempotency-Key, the User-Agent and in the path.
	rec.do(t, "POST", base+"/v1/chat/completions", apptest.ClientKey, strings.NewReader(`{"model":"`+apptest.ClientKey2+`"}`),
		with("Idempotency-Key", apptest.ClientKey2, "User-Agent", "agent "+auditMetricsToken))
	rec.do(t, "GET", base+"/v1/files/"+apptest.ClientKey2, apptest.ClientKey, nil, nil)
	rec.do(t, "GET", base+"/v1/models", apptest.UpstreamKey, nil, nil) // the upstream key is no client key
	rec.do(t, "GET", base+"/v1/models", "pk-guess-00000000", nil, nil)
	rec.do(t, "GET", base+"/v1/models?api_key="+apptest.ClientKey, "", nil, nil)
	rec.do(t, "GET", base+"/v1/../dashboard", apptest.ClientKey, nil, nil)
	rec.do(t, "GET", base+"/audit/panic", apptest.ClientKey, nil, nil)
	if status, _ := rec.do(t, "GET", base+"/v1/models", apptest.ClientKey, nil, with("Idempotency-Key", "x")); status != 200 {
		t.Fatalf("models: %d", status)
	}
	if status, body := rec.do(t, "POST", base+"/v1/chat/completions?test_echo_auth=1", apptest.ClientKey, strings.NewReader(chat), js); status != 401 || !strings.Contains(body, "Bearer ****") {
		t.Fatalf("echoing upstream: %d %s", status, body)
	}

	// The dashboard: a wrong password, then the right one, then every page.
	_, page := rec.do(t, "GET", base+"/dashboard/login", "", nil, nil)
	token := auditCSRF.FindStringSubmatch(page)
	if token == nil {
		t.Fatalf("no CSRF token on the login page")
	}
	form := func(v url.Values) (io.Reader, map[string]string) {
		return strings.NewReader(v.Encode()), map[string]string{"Content-Type": "application/x-www-form-urlencoded"}
	}
	body, hdr := form(url.Values{"_csrf": {token[1]}, "password": {apptest.UpstreamKey}})
	rec.do(t, "POST", base+"/dashboard/login", "", body, hdr)
	_, page = rec.do(t, "GET", base+"/dashboard/login", "", nil, nil)
	token = auditCSRF.FindStringSubmatch(page)
	body, hdr = form(url.Values{"_csrf": {token[1]}, "password": {auditAdminPassword}})
	if status, _ := rec.do(t, "POST", base+"/dashboard/login", "", body, hdr); status/100 != 3 {
		t.Fatalf("login: %d", status)
	}
	waitForLog(t, px, 10)
	var logIDs []int64
	px.App.Store.DB().Model(&models.RequestLog{}).Order("id").Limit(20).Pluck("id", &logIDs)
	var keyIDs []string
	px.App.Store.DB().Model(&models.IdempotencyRecord{}).Pluck("id", &keyIDs)
	pages := []string{"/dashboard", "/dashboard?window=7d", "/dashboard/requests", "/dashboard/keys", "/dashboard/keys?key=audit"}
	for _, id := range logIDs {
		pages = append(pages, fmt.Sprintf("/dashboard/requests/%d", id))
	}
	for _, id := range keyIDs {
		pages = append(pages, "/dashboard/keys/"+id)
	}
	for _, p := range pages {
		if status, _ := rec.do(t, "GET", base+p, "", nil, nil); status != 200 {
			t.Fatalf("%s: %d", p, status)
		}
	}
	rec.do(t, "GET", base+"/metrics", "", nil, nil)
	if status, _ := rec.do(t, "GET", base+"/metrics", auditMetricsToken, nil, nil); status != 200 {
		t.Fatalf("metrics: %d", status)
	}
	up.Release()
}

func waitForLog(t *testing.T, px *apptest.Instance, n uint64) {
	t.Helper()
	apptest.Eventually(t, 15*time.Second, func() bool { return px.App.Logs.Written() >= n }, "request log: fewer than %d written", n)
}

// dumpPostgres renders every row of every table in the test schema.
func dumpPostgres(t *testing.T, dbURL string) string {
	t.Helper()
	db, err := sql.Open("pgx", dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tables, err := db.Query("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for tables.Next() {
		var n string
		_ = tables.Scan(&n)
		names = append(names, n)
	}
	tables.Close()
	if len(names) < 3 {
		t.Fatalf("only tables %v", names)
	}
	var out strings.Builder
	for _, n := range names {
		rows, err := db.QueryContext(context.Background(), `SELECT * FROM "`+n+`"`)
		if err != nil {
			t.Fatal(err)
		}
		cols, _ := rows.Columns()
		vals := make([]any, len(cols))
		ptrs := make([]any, len(cols))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		for rows.Next() {
			_ = rows.Scan(ptrs...)
			for _, v := range vals {
				if b, ok := v.([]byte); ok {
					out.Write(b)
				} else {
					fmt.Fprint(&out, v)
				}
				out.WriteByte('\t')
			}
			out.WriteByte('\n')
		}
		rows.Close()
	}
	return out.String()
}

// dumpDir returns the raw bytes of every file in the SQLite data directory:
// the database, its WAL and anything else the proxy wrote there.
func dumpDir(t *testing.T, dir string) string {
	t.Helper()
	var out strings.Builder
	_ = filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			b, _ := os.ReadFile(path)
			out.Write(b)
		}
		return nil
	})
	return out.String()
}
