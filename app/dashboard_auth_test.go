package app_test

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// rowCounts counts the rows of every table of the instance's schema.
func rowCounts(t *testing.T, px *apptest.Instance) map[string]int64 {
	t.Helper()
	db := px.App.Store.DB()
	var tables []string
	q := "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
	if px.App.Store.Dialect() == "postgres" {
		q = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
	}
	if err := db.Raw(q).Scan(&tables).Error; err != nil {
		t.Fatal(err)
	}
	counts := map[string]int64{}
	for _, name := range tables {
		var n int64
		if err := db.Raw(`SELECT count(*) FROM "` + name + `"`).Scan(&n).Error; err != nil {
			t.Fatal(err)
		}
		counts[name] = n
	}
	return counts
}

// Anonymous visitors of the login form cost no database row: its CSRF
// token is signed against a nonce in a cookie.
func TestDashboardLoginFormWritesNothing(t *testing.T) {
	apptest.EachDB(t, adminEnv, func(t *testing.T, env map[string]string) {
		up := apptest.NewUpstream(t)
		px := apptest.Start(t, up.URL, env)
		before := rowCounts(t, px)
		for range 200 {
			newBrowser(t, px).page("/dashboard/login")
		}
		after := rowCounts(t, px)
		var added int64
		for name, n := range after {
			if n != before[name] {
				t.Errorf("table %s: %d rows before 200 anonymous login views, %d after", name, before[name], n)
			}
			added += n - before[name]
		}
		t.Logf("rows added by 200 anonymous login-page views: %d", added)
	})
}

// CSRF tokens belong to one session, change at every sign-in, and are
// read from the form body only.
func TestDashboardCSRFBoundToSession(t *testing.T) {
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"ADMIN_PASSWORD": adminPassword})
	recs := seedKeyRecords(t, px, time.Now().UTC(), 1)
	b := newBrowser(t, px)

	// The login form's token is refused from the query string.
	token := csrfOf(t, b.page("/dashboard/login"))
	if resp, _ := b.post("/dashboard/login?_csrf="+url.QueryEscape(token), url.Values{"password": {adminPassword}}); resp.StatusCode != 403 {
		t.Errorf("login token in the query string: %d, want 403", resp.StatusCode)
	}
	b.login()
	first := csrfOf(t, b.page("/dashboard/keys"))
	if first == token {
		t.Error("the session's token is the login form's token: not rotated at sign-in")
	}
	del := "/dashboard/keys/" + recs[0].ID + "/delete"
	if resp, _ := b.post(del+"?_csrf="+url.QueryEscape(first), url.Values{"confirm": {"yes"}}); resp.StatusCode != 403 {
		t.Errorf("session token in the query string: %d, want 403", resp.StatusCode)
	}
	// Another signed-in browser's token does not work here.
	other := newBrowser(t, px)
	other.login()
	if resp, _ := b.post(del, url.Values{"confirm": {"yes"}, "_csrf": {csrfOf(t, other.page("/dashboard/keys"))}}); resp.StatusCode != 403 {
		t.Errorf("another session's token: %d, want 403", resp.StatusCode)
	}
	// Signing in again rotates the token, and the old one is dead.
	if resp, _ := b.post("/dashboard/logout", url.Values{"_csrf": {first}}); resp.StatusCode != 303 {
		t.Fatalf("logout: %d", resp.StatusCode)
	}
	b.login()
	second := csrfOf(t, b.page("/dashboard/keys"))
	if second == first {
		t.Error("CSRF token unchanged across sign-ins")
	}
	if resp, _ := b.post(del, url.Values{"confirm": {"yes"}, "_csrf": {first}}); resp.StatusCode != 403 {
		t.Errorf("previous session's token: %d, want 403", resp.StatusCode)
	}
	if _, err := px.App.Store.IdempotencyByID(t.Context(), recs[0].ID); err != nil {
		t.Fatal("a refused form deleted the key")
	}
	if resp, _ := b.post(del, url.Values{"confirm": {"yes"}, "_csrf": {second}}); resp.StatusCode != 303 {
		t.Errorf("the session's own token: %d, want 303", resp.StatusCode)
	}
}

// Two replicas on one PostgreSQL, 40 wrong passwords at once spread over
// both: the count is one atomic statement, so at most loginAttempts (5)
// passwords are checked.
func TestDashboardLoginThrottleIsAtomicAcrossReplicas(t *testing.T) {
	dbURL := testdb.PostgresURL(t)
	up := apptest.NewUpstream(t)
	env := map[string]string{"ADMIN_PASSWORD": adminPassword, "DATABASE_URL": dbURL}
	replicas := []*apptest.Instance{apptest.Start(t, up.URL, env), apptest.Start(t, up.URL, env)}
	attacker := newBrowser(t, replicas[0])
	token := csrfOf(t, attacker.page("/dashboard/login"))
	u, _ := url.Parse(replicas[0].URL + "/dashboard/login")
	cookies := attacker.http.Jar.Cookies(u)

	const n = 40
	statuses := make([]int, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			form := url.Values{"_csrf": {token}, "password": {fmt.Sprintf("wrong-%d", i)}}
			req, _ := http.NewRequest("POST", replicas[i%2].URL+"/dashboard/login", strings.NewReader(form.Encode()))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			for _, c := range cookies {
				req.AddCookie(c)
			}
			<-start
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			_ = resp.Body.Close()
			statuses[i] = resp.StatusCode
		})
	}
	close(start)
	wg.Wait()
	counts := map[int]int{}
	for _, s := range statuses {
		counts[s]++
	}
	t.Logf("40 parallel wrong passwords on two replicas: %d checked (401), %d throttled (429), others %v",
		counts[401], counts[429], counts)
	if counts[401] > 5 || counts[401]+counts[429] != n {
		t.Errorf("got %v; want at most 5 × 401 and the rest 429", counts)
	}
}

// With the database really cut (a TCP relay in front of PostgreSQL, closed),
// a signed-in admin still gets pages: the "database unreachable" banner
// and what can be shown, never a bare 500; signing in says why it cannot.
func TestDashboardWithDatabaseCut(t *testing.T) {
	dbURL, fw := testdb.ThroughForwarder(t, testdb.PostgresURL(t))
	up := apptest.NewUpstream(t)
	px := apptest.Start(t, up.URL, map[string]string{"ADMIN_PASSWORD": adminPassword, "DATABASE_URL": dbURL})
	admin := newBrowser(t, px)
	admin.login()
	visitor := newBrowser(t, px)
	token := csrfOf(t, visitor.page("/dashboard/login"))

	fw.Down()
	pages := []string{"/dashboard", "/dashboard?window=7d", "/dashboard/requests", "/dashboard/requests?status=5xx",
		"/dashboard/requests/1", "/dashboard/keys", "/dashboard/keys/abc"}
	for _, path := range pages {
		resp, body := admin.get(path)
		t.Logf("database cut: GET %s → %d", path, resp.StatusCode)
		if resp.StatusCode != 200 && resp.StatusCode != 503 {
			t.Errorf("GET %s with the database cut: %d, want 200 or 503", path, resp.StatusCode)
		}
		contains(t, "cut "+path, body, "<strong>Database unreachable.</strong>", "Sign out")
		if strings.Contains(body, "Something went wrong") {
			t.Errorf("GET %s: a generic error page", path)
		}
	}
	// Sign-in explains; the form itself still renders without the database.
	resp, body := visitor.post("/dashboard/login", url.Values{"_csrf": {token}, "password": {adminPassword}})
	if resp.StatusCode != 503 || !strings.Contains(body, "database is unreachable") || strings.Contains(body, "had expired") {
		t.Errorf("sign-in with the database cut: %d\n%s", resp.StatusCode, body)
	}
	newBrowser(t, px).page("/dashboard/login")
	// Signing out still signs this browser out, and says what it could not do.
	resp, _ = admin.post("/dashboard/logout", url.Values{"_csrf": {csrfOf(t, admin.page("/dashboard"))}})
	if loc := resp.Header.Get("Location"); resp.StatusCode != 303 || loc != "/dashboard/login?bye=local" {
		t.Errorf("logout with the database cut: %d %s", resp.StatusCode, loc)
	}
	contains(t, "logout notice", visitor.page("/dashboard/login?bye=local"), "could not be ended on the server")

	fw.Up()
	apptest.Eventually(t, 10*time.Second, func() bool {
		resp, body := visitor.post("/dashboard/login", url.Values{"_csrf": {token}, "password": {adminPassword}})
		return resp.StatusCode == 303 || strings.Contains(body, "not correct")
	}, "sign-in never worked again after the database came back")
	for _, path := range []string{"/dashboard", "/dashboard/requests", "/dashboard/keys"} {
		if body := visitor.page(path); strings.Contains(body, "Database unreachable") {
			t.Errorf("GET %s: banner still shown with the database back", path)
		}
	}
}
