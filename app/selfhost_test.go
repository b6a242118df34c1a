package app_test

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" driver that holds the migration lock
	"github.com/pressly/goose/v3/lock"

	"github.com/openai-idempotent-proxy/proxy/app"
	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// composeOnly names the variables in .env.example that docker-compose.yml
// reads for itself; every other name there must be a proxy setting.
var composeOnly = []string{"POSTGRES_PASSWORD"}

// repoRoot is the module root, where the self-hosting files live.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// loadCompose loads the repository's docker-compose.yml the way
// `docker compose up` does after the documented `cp .env.example .env`, with
// one difference: the project directory is a temporary one holding that .env
// (a copy of .env.example), so the test never reads or overwrites a real
// .env in the checkout. Nothing comes from the shell's environment. With
// dotenv empty, no .env is written at all.
func loadCompose(t *testing.T, dotenv string) (*types.Project, string, error) {
	t.Helper()
	dir := t.TempDir()
	opts := []cli.ProjectOptionsFn{
		cli.WithWorkingDirectory(dir),
		cli.WithName("selfhost-test"),
	}
	if dotenv != "" {
		envPath := filepath.Join(dir, ".env")
		if err := os.WriteFile(envPath, []byte(dotenv), 0o600); err != nil {
			t.Fatal(err)
		}
		// The project-level .env that compose reads for ${...} substitution.
		opts = append(opts, cli.WithEnvFiles(envPath), cli.WithDotEnv)
	}
	po, err := cli.NewProjectOptions([]string{filepath.Join(repoRoot(t), "docker-compose.yml")}, opts...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := po.LoadProject(ctx)
	return p, dir, err
}

func readFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestComposeFile(t *testing.T) {
	example := readFile(t, ".env.example")
	p, dir, err := loadCompose(t, example)
	if err != nil {
		t.Fatalf("docker-compose.yml with .env copied from .env.example does not load: %v", err)
	}

	if got := slices.Sorted(func(yield func(string) bool) {
		for name := range p.Services {
			if !yield(name) {
				return
			}
		}
	}); !slices.Equal(got, []string{"db", "proxy"}) {
		t.Fatalf("services = %v, want exactly [db proxy]", got)
	}
	proxy, db := p.Services["proxy"], p.Services["db"]

	t.Run("proxy builds from the Dockerfile", func(t *testing.T) {
		if proxy.Build == nil {
			t.Fatal("proxy has no build section")
		}
		if proxy.Build.Context != dir && proxy.Build.Context != "." {
			t.Errorf("build context = %q, want the project directory", proxy.Build.Context)
		}
		if df := proxy.Build.Dockerfile; df != "" && df != "Dockerfile" {
			t.Errorf("build dockerfile = %q, want Dockerfile", df)
		}
		if _, err := os.Stat(filepath.Join(repoRoot(t), "Dockerfile")); err != nil {
			t.Error(err)
		}
		if proxy.Image == "" {
			t.Error("proxy has no image name to tag the build with")
		}
	})

	t.Run("proxy publishes 8080 and listens there", func(t *testing.T) {
		published := false
		for _, port := range proxy.Ports {
			if port.Target == 8080 && port.Published == "8080" && (port.Protocol == "" || port.Protocol == "tcp") {
				published = true
			}
		}
		if !published {
			t.Errorf("proxy ports = %+v, want 8080:8080", proxy.Ports)
		}
		if got := envValue(proxy.Environment, "LISTEN_ADDR"); got != ":8080" {
			t.Errorf("proxy LISTEN_ADDR = %q, want :8080 to match the port and the healthcheck", got)
		}
	})

	t.Run("proxy waits for a healthy db", func(t *testing.T) {
		dep, ok := proxy.DependsOn["db"]
		if !ok {
			t.Fatalf("proxy depends_on = %v, want db", proxy.DependsOn)
		}
		if dep.Condition != types.ServiceConditionHealthy {
			t.Errorf("depends_on db condition = %q, want %q", dep.Condition, types.ServiceConditionHealthy)
		}
	})

	t.Run("healthchecks", func(t *testing.T) {
		hc := proxy.HealthCheck
		if hc == nil || hc.Disable {
			t.Fatal("proxy has no healthcheck")
		}
		if want := []string{"CMD", "/proxy", "healthcheck"}; !slices.Equal(hc.Test, want) {
			t.Errorf("proxy healthcheck test = %q, want %q", hc.Test, want)
		}
		if hc.Interval == nil || hc.Timeout == nil || hc.Retries == nil || hc.StartPeriod == nil {
			t.Errorf("proxy healthcheck wants interval, timeout, retries and start_period: %+v", hc)
		}

		hc = db.HealthCheck
		if hc == nil || hc.Disable {
			t.Fatal("db has no healthcheck")
		}
		user, name := envValue(db.Environment, "POSTGRES_USER"), envValue(db.Environment, "POSTGRES_DB")
		cmd := strings.Join(hc.Test, " ")
		for _, want := range []string{"pg_isready", "-U " + user, "-d " + name} {
			if !strings.Contains(cmd, want) {
				t.Errorf("db healthcheck %q lacks %q", cmd, want)
			}
		}
	})

	t.Run("db is PostgreSQL 16 or 17 on a named volume, unpublished", func(t *testing.T) {
		if !regexp.MustCompile(`^(docker\.io/(library/)?)?postgres:1[67]([.-]|$)`).MatchString(db.Image) {
			t.Errorf("db image = %q, want the official postgres:16 or postgres:17", db.Image)
		}
		mounted := false
		for _, v := range db.Volumes {
			if v.Type == types.VolumeTypeVolume && v.Source == "pgdata" && v.Target == "/var/lib/postgresql/data" {
				mounted = true
			}
		}
		if !mounted {
			t.Errorf("db volumes = %+v, want pgdata:/var/lib/postgresql/data", db.Volumes)
		}
		if _, ok := p.Volumes["pgdata"]; !ok {
			t.Errorf("top-level volumes = %v, want pgdata declared", p.Volumes)
		}
		if len(db.Ports) != 0 {
			t.Errorf("db publishes %+v: the database must be reachable only from the proxy", db.Ports)
		}
	})

	t.Run("DATABASE_URL matches the db service", func(t *testing.T) {
		raw := envValue(proxy.Environment, "DATABASE_URL")
		u, err := url.Parse(raw)
		if err != nil {
			t.Fatalf("DATABASE_URL: %v", err)
		}
		if u.Scheme != "postgres" && u.Scheme != "postgresql" {
			t.Errorf("DATABASE_URL scheme = %q", u.Scheme)
		}
		if u.Hostname() != "db" || (u.Port() != "" && u.Port() != "5432") {
			t.Errorf("DATABASE_URL host = %q, want db:5432", u.Host)
		}
		pass, _ := u.User.Password()
		if got, want := u.User.Username(), envValue(db.Environment, "POSTGRES_USER"); got != want || got == "" {
			t.Errorf("DATABASE_URL user = %q, db creates %q", got, want)
		}
		if want := envValue(db.Environment, "POSTGRES_PASSWORD"); pass != want || pass == "" {
			t.Errorf("DATABASE_URL password differs from the db's POSTGRES_PASSWORD")
		}
		// The password comes from POSTGRES_PASSWORD in .env, not the fallback.
		if want := dotenvValues(t, example)["POSTGRES_PASSWORD"]; pass != want {
			t.Errorf("DATABASE_URL password is not POSTGRES_PASSWORD from .env")
		}
		if got, want := strings.TrimPrefix(u.Path, "/"), envValue(db.Environment, "POSTGRES_DB"); got != want || got == "" {
			t.Errorf("DATABASE_URL database = %q, db creates %q", got, want)
		}
	})

	t.Run("restart policies", func(t *testing.T) {
		for _, s := range []types.ServiceConfig{proxy, db} {
			if s.Restart != types.RestartPolicyUnlessStopped && s.Restart != types.RestartPolicyAlways {
				t.Errorf("%s restart = %q, want unless-stopped or always", s.Name, s.Restart)
			}
		}
	})

	t.Run("required settings come from the env file", func(t *testing.T) {
		fromFile := false
		for _, f := range proxy.EnvFiles {
			if f.Path == filepath.Join(dir, ".env") {
				fromFile = true
			}
		}
		if !fromFile {
			t.Fatalf("proxy env_file = %+v, want .env", proxy.EnvFiles)
		}
		values := dotenvValues(t, example)
		for _, name := range []string{"OPENAI_API_KEY", "PROXY_API_KEYS", "ADMIN_PASSWORD"} {
			got := envValue(proxy.Environment, name)
			if got == "" || got != values[name] {
				t.Errorf("%s = %q in the proxy container, want %q from .env", name, got, values[name])
			}
		}
		// The container's whole environment is a configuration the proxy
		// accepts: required values present, every value parses.
		cfg, err := app.LoadConfig(func(k string) string { return envValue(proxy.Environment, k) })
		if err != nil {
			t.Fatalf("the proxy would refuse to start: %v", err)
		}
		if cfg.DatabaseURL == "" {
			t.Error("the proxy would use SQLite instead of the db service")
		}
	})
}

// Without .env, compose must stop instead of starting a proxy with no keys.
func TestComposeRequiresDotEnv(t *testing.T) {
	_, _, err := loadCompose(t, "")
	if err == nil || !strings.Contains(err.Error(), ".env") {
		t.Fatalf("loading without .env: err = %v, want an error naming .env", err)
	}
}

// envValue reads one variable of a resolved service environment.
func envValue(env types.MappingWithEquals, name string) string {
	if v := env[name]; v != nil {
		return *v
	}
	return ""
}

// envLine matches a setting line of .env.example, set ("NAME=value") or
// shown with its default ("# NAME=value").
var envLine = regexp.MustCompile(`^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$`)

type envEntry struct {
	name, value string
	set         bool     // not commented out
	comments    []string // the comment lines directly above
}

func parseEnvExample(t *testing.T, text string) []envEntry {
	t.Helper()
	var (
		entries  []envEntry
		comments []string
	)
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if m := envLine.FindStringSubmatch(line); m != nil {
			entries = append(entries, envEntry{name: m[2], value: m[3], set: m[1] == "", comments: comments})
			comments = nil
			continue
		}
		if strings.HasPrefix(line, "#") {
			comments = append(comments, strings.TrimSpace(strings.TrimPrefix(line, "#")))
		} else {
			comments = nil
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return entries
}

// dotenvValues returns the variables an env file sets (commented lines not).
func dotenvValues(t *testing.T, text string) map[string]string {
	t.Helper()
	values := map[string]string{}
	for _, e := range parseEnvExample(t, text) {
		if e.set {
			values[e.name] = e.value
		}
	}
	return values
}

func TestEnvExampleMatchesSettings(t *testing.T) {
	entries := parseEnvExample(t, readFile(t, ".env.example"))

	var want, got []string
	for _, s := range app.Settings() {
		want = append(want, s.Name)
	}
	want = append(want, composeOnly...)
	for _, e := range entries {
		got = append(got, e.name)
	}
	// Same names, same order as Settings(): no setting missing, none stale.
	if !slices.Equal(got, want) {
		for _, n := range want {
			if !slices.Contains(got, n) {
				t.Errorf(".env.example lacks %s", n)
			}
		}
		for _, n := range got {
			if !slices.Contains(want, n) {
				t.Errorf(".env.example names %s, which app.Settings() does not read", n)
			}
		}
		if !t.Failed() {
			t.Errorf(".env.example order or duplicates differ:\n got %v\nwant %v", got, want)
		}
		return
	}

	for i, s := range app.Settings() {
		e := entries[i]
		block := strings.Join(e.comments, "\n")
		def := s.Default
		if def == "" {
			def = "none"
		}
		if !strings.Contains(block, s.Help) || !strings.Contains(block, "(default: "+def+")") {
			t.Errorf("%s: the comment above should carry its help %q and \"(default: %s)\"; got:\n%s", s.Name, s.Help, def, block)
		}
		if !e.set && e.value != s.Default {
			t.Errorf("%s: commented-out value %q differs from the default %q", s.Name, e.value, s.Default)
		}
	}

	byName := map[string]envEntry{}
	for _, e := range entries {
		byName[e.name] = e
	}
	for _, name := range []string{"OPENAI_API_KEY", "PROXY_API_KEYS", "ADMIN_PASSWORD", "POSTGRES_PASSWORD"} {
		if e := byName[name]; !e.set || e.value == "" {
			t.Errorf("%s must be set to a placeholder in .env.example", name)
		}
	}
	// The compose password goes into a URL unescaped.
	if v := byName["POSTGRES_PASSWORD"].value; !regexp.MustCompile(`^[A-Za-z0-9_-]+$`).MatchString(v) {
		t.Errorf("POSTGRES_PASSWORD placeholder %q is not URL-safe", v)
	}
}

func TestHealthcheck(t *testing.T) {
	healthz := func(status int) http.Handler {
		mux := http.NewServeMux()
		mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
			w.WriteHeader(status)
		})
		return mux
	}
	port := func(t *testing.T, srv *httptest.Server) string {
		t.Helper()
		_, p, err := net.SplitHostPort(srv.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	// run calls Healthcheck with LISTEN_ADDR alone and checks that no other
	// setting is read: the probe must work without OPENAI_API_KEY & co.
	run := func(t *testing.T, ctx context.Context, listenAddr string) (int, string) {
		t.Helper()
		var stderr bytes.Buffer
		code := app.Healthcheck(ctx, func(name string) string {
			if name != "LISTEN_ADDR" {
				t.Errorf("Healthcheck read %s; it must read LISTEN_ADDR only", name)
			}
			return listenAddr
		}, &stderr)
		if code != 0 && strings.Count(stderr.String(), "\n") != 1 {
			t.Errorf("failure should print exactly one line, got %q", stderr.String())
		}
		if code == 0 && stderr.Len() != 0 {
			t.Errorf("success printed %q", stderr.String())
		}
		return code, stderr.String()
	}

	up := httptest.NewServer(healthz(http.StatusOK))
	defer up.Close()
	for _, addr := range []string{"127.0.0.1:%s", ":%s", "0.0.0.0:%s", "[::]:%s", "  :%s  "} {
		addr = fmt.Sprintf(addr, port(t, up))
		t.Run("up "+strings.TrimSpace(addr), func(t *testing.T) {
			if code, stderr := run(t, context.Background(), addr); code != 0 {
				t.Errorf("exit %d (%s), want 0", code, stderr)
			}
		})
	}

	t.Run("503", func(t *testing.T) {
		down := httptest.NewServer(healthz(http.StatusServiceUnavailable))
		defer down.Close()
		code, stderr := run(t, context.Background(), ":"+port(t, down))
		if code == 0 || !strings.Contains(stderr, "503") {
			t.Errorf("exit %d, stderr %q: want non-zero naming the 503", code, stderr)
		}
	})

	t.Run("closed port", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		if code, stderr := run(t, context.Background(), addr); code == 0 || !strings.Contains(stderr, "healthcheck") {
			t.Errorf("exit %d, stderr %q: want non-zero", code, stderr)
		}
	})

	t.Run("hung server honours the context", func(t *testing.T) {
		hung := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }))
		defer hung.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		code, _ := run(t, ctx, ":"+port(t, hung))
		if code == 0 {
			t.Error("exit 0 from a server that never answers")
		}
		if took := time.Since(start); took > 2*time.Second {
			t.Errorf("took %v, want it to stop at the context deadline", took)
		}
	})

	t.Run("invalid LISTEN_ADDR", func(t *testing.T) {
		if code, stderr := run(t, context.Background(), "localhost"); code == 0 || !strings.Contains(stderr, "LISTEN_ADDR") {
			t.Errorf("exit %d, stderr %q: want non-zero naming LISTEN_ADDR", code, stderr)
		}
	})

	t.Run("default from Settings", func(t *testing.T) {
		var def string
		for _, s := range app.Settings() {
			if s.Name == "LISTEN_ADDR" {
				def = s.Default
			}
		}
		_, p, err := net.SplitHostPort(def)
		if err != nil {
			t.Fatalf("LISTEN_ADDR default %q: %v", def, err)
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+p)
		if err != nil {
			t.Skipf("port %s is busy on this machine: %v", p, err)
		}
		srv := httptest.NewUnstartedServer(healthz(http.StatusOK))
		srv.Listener.Close()
		srv.Listener = l
		srv.Start()
		defer srv.Close()
		if code, stderr := run(t, context.Background(), ""); code != 0 {
			t.Errorf("exit %d (%s) with LISTEN_ADDR unset, want 0 from the default %s", code, stderr, def)
		}
	})
}

// Two replicas started at the same moment on one fresh PostgreSQL both come
// up, and the advisory lock makes each migration run exactly once.
//
// To make the two really contend, the test first holds the migration lock
// itself, so both instances queue on it, then releases it: both retry at
// about the same moment, one migrates, the other waits and finds nothing to
// do. Neither may finish while the test holds the lock.
func TestConcurrentStartMigratesOnce(t *testing.T) {
	dbURL := testdb.PostgresURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	holder, err := sql.Open("pgx", dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	conn, err := holder.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, "SELECT pg_advisory_lock($1)", lock.DefaultLockID); err != nil {
		t.Fatal(err)
	}

	var (
		wg       sync.WaitGroup
		start    = make(chan struct{})
		stores   [2]*models.Store
		errs     [2]error
		finished [2]time.Time
	)
	// The instances name their connections, so the test can see them try
	// the lock.
	appName := fmt.Sprintf("contend_%d", time.Now().UnixNano())
	instanceURL := dbURL + map[bool]string{true: "&", false: "?"}[strings.Contains(dbURL, "?")] + "application_name=" + appName
	for i := range stores {
		wg.Go(func() {
			<-start
			stores[i], errs[i] = models.Open(ctx, models.Options{DatabaseURL: instanceURL})
			finished[i] = time.Now()
		})
	}
	close(start)
	// Both have tried the lock, failed, and retry.
	apptest.Eventually(t, 30*time.Second, func() bool {
		var n int
		err := conn.QueryRowContext(ctx, `SELECT COUNT(DISTINCT pid) FROM pg_stat_activity
			WHERE application_name = $1 AND query LIKE '%pg_try_advisory_lock%'`, appName).Scan(&n)
		return err == nil && n >= 2
	}, "the two instances never tried the migration lock")
	released := time.Now()
	if _, err := conn.ExecContext(ctx, "SELECT pg_advisory_unlock($1)", lock.DefaultLockID); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	for i, s := range stores {
		if errs[i] != nil {
			t.Errorf("instance %d: %v", i, errs[i])
		}
		if s != nil {
			t.Cleanup(func() { _ = s.Close() })
		}
		if finished[i].Before(released) {
			t.Errorf("instance %d started while another process held the migration lock", i)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	rows, err := stores[0].DB().WithContext(ctx).
		Raw("SELECT version_id, COUNT(*) FROM goose_db_version WHERE is_applied GROUP BY version_id ORDER BY version_id").Rows()
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	applied := map[int64]int{}
	for rows.Next() {
		var version int64
		var n int
		if err := rows.Scan(&version, &n); err != nil {
			t.Fatal(err)
		}
		applied[version] = n
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}

	files, err := filepath.Glob(filepath.Join(repoRoot(t), "migrations", "postgres", "*.sql"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no PostgreSQL migrations found: %v", err)
	}
	want := map[int64]int{0: 1} // goose's row for the version table itself
	for _, f := range files {
		prefix, _, _ := strings.Cut(filepath.Base(f), "_")
		v, err := strconv.ParseInt(prefix, 10, 64)
		if err != nil {
			t.Fatalf("%s: migration file without a numeric version prefix: %v", f, err)
		}
		want[v] = 1
	}
	for v, n := range want {
		if applied[v] != n {
			t.Errorf("version %d recorded %d times, want once", v, applied[v])
		}
	}
	for v := range applied {
		if _, ok := want[v]; !ok {
			t.Errorf("version %d recorded but no migration file has it", v)
		}
	}
}

// dockerInstructions returns the Dockerfile's instructions, continuation
// lines joined and comments dropped, as [keyword, arguments] pairs.
func dockerInstructions(text string) [][2]string {
	var (
		out  [][2]string
		cur  strings.Builder
		cont bool
	)
	for _, line := range strings.Split(text, "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") || (trimmed == "" && !cont) {
			continue
		}
		body, more := strings.CutSuffix(trimmed, `\`)
		cur.WriteString(body)
		cur.WriteString(" ")
		cont = more
		if !more {
			kw, args, _ := strings.Cut(strings.TrimSpace(cur.String()), " ")
			out = append(out, [2]string{strings.ToUpper(kw), strings.Join(strings.Fields(args), " ")})
			cur.Reset()
		}
	}
	return out
}

func TestDockerfile(t *testing.T) {
	var (
		froms       []string
		last        [][2]string // instructions of the final stage
		build, user string
	)
	for _, in := range dockerInstructions(readFile(t, "Dockerfile")) {
		kw, args := in[0], in[1]
		if kw == "FROM" {
			froms = append(froms, args)
			last = nil
			continue
		}
		last = append(last, in)
		if kw == "RUN" && strings.Contains(args, "go build") {
			build = args
		}
	}
	if len(froms) < 2 {
		t.Fatalf("FROM lines = %q, want a multi-stage build", froms)
	}
	if !strings.Contains(froms[0], "golang:") {
		t.Errorf("build stage %q, want the official golang image", froms[0])
	}
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "-s -w", "-o /out/proxy"} {
		if !strings.Contains(build, want) {
			t.Errorf("go build step %q lacks %q", build, want)
		}
	}

	final := froms[len(froms)-1]
	got := map[string]string{}
	for _, in := range last {
		got[in[0]] += in[1] + "\n"
		if in[0] == "USER" {
			user = in[1]
		}
	}
	rootUser := user == "" || user == "root" || user == "0" || strings.HasPrefix(user, "root:") || strings.HasPrefix(user, "0:")
	if rootUser && !strings.HasSuffix(final, ":nonroot") {
		t.Errorf("final stage %q runs as root (USER %q)", final, user)
	}
	for kw, want := range map[string]string{
		"COPY":        "/proxy",
		"EXPOSE":      "8080",
		"ENV":         "DATA_DIR=/data",
		"HEALTHCHECK": `CMD ["/proxy", "healthcheck"]`,
		"ENTRYPOINT":  `["/proxy"]`,
	} {
		if !strings.Contains(got[kw], want) {
			t.Errorf("final stage %s = %q, want it to contain %q", kw, got[kw], want)
		}
	}

	// Secrets and the repository history stay out of the build context.
	ignore := strings.Fields(readFile(t, ".dockerignore"))
	for _, want := range []string{".env", ".git"} {
		if !slices.Contains(ignore, want) {
			t.Errorf(".dockerignore lacks %s", want)
		}
	}
}
