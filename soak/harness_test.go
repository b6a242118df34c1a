//go:build linux

package soak

// The harness shared by the soak tests: the proxy binary run as a separate
// process (so its RSS, threads, file descriptors and goroutines are its
// own), a lean fake upstream in the test process, a plain HTTP client,
// Prometheus text scraping and PostgreSQL control.

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver for the accounting queries
	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

const (
	upstreamKey = "sk-soak-upstream-SECRET-0123456789abcdef"
	clientKey   = "pk-soak-client-0123456789"
	// defaultTestDB is the database .ci/run provides; SOAK=1 uses it when
	// TEST_DATABASE_URL is unset.
	defaultTestDB = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

	chatBody   = `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"soak"}]}`
	streamBody = `{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"soak"}]}`
)

// requireSoak skips unless SOAK=1, and points TEST_DATABASE_URL at the
// local test database when it is unset.
func requireSoak(t *testing.T) {
	t.Helper()
	if os.Getenv("SOAK") != "1" {
		t.Skip("soak test: opt-in, set SOAK=1 (see soak/README.md)")
	}
	if os.Getenv("TEST_DATABASE_URL") == "" {
		t.Setenv("TEST_DATABASE_URL", defaultTestDB)
	}
}

func envDuration(t *testing.T, name string, def time.Duration) time.Duration {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q: want a positive Go duration such as 90s or 10m", name, v)
	}
	return d
}

func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

func envBool(name string, def bool) bool {
	switch os.Getenv(name) {
	case "1", "true", "yes":
		return true
	case "0", "false", "no":
		return false
	}
	return def
}

// ---------------------------------------------------------------------------
// The proxy process.

// buildProxy compiles the proxy from the repository root, or returns
// SOAK_PROXY_BIN when it names a binary already built (another commit's,
// for a before-and-after in the same harness).
func buildProxy(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("SOAK_PROXY_BIN"); bin != "" {
		if _, err := os.Stat(bin); err != nil {
			t.Fatalf("SOAK_PROXY_BIN: %v", err)
		}
		t.Logf("proxy binary from SOAK_PROXY_BIN: %s", bin)
		return bin
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "proxy")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

type proxyProc struct {
	URL     string
	LogPath string
	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error
}

// startProxy runs the proxy binary on a free 127.0.0.1 port with a clean
// environment (only PATH, HOME and TMPDIR are inherited) and waits for
// /healthz. Its log goes to a file kept after the test, for inspection.
func startProxy(t *testing.T, bin, upstreamURL, dbURL string, extra map[string]string) *proxyProc {
	t.Helper()
	return startProxyUnder(t, nil, bin, upstreamURL, dbURL, extra)
}

// startProxyUnder is startProxy with the binary run by a wrapper command
// (valgrind, say: then start-up may take a minute).
func startProxyUnder(t *testing.T, wrapper []string, bin, upstreamURL, dbURL string, extra map[string]string) *proxyProc {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	vars := map[string]string{
		"OPENAI_API_KEY":    upstreamKey,
		"UPSTREAM_BASE_URL": upstreamURL,
		"PROXY_API_KEYS":    "soak:" + clientKey,
		"DATABASE_URL":      dbURL,
		"LISTEN_ADDR":       addr,
		"DATA_DIR":          t.TempDir(),
		"LOG_LEVEL":         "warn",
		"SHUTDOWN_GRACE":    "10s",
	}
	for _, kv := range strings.Fields(os.Getenv("SOAK_PROXY_ENV")) {
		if k, v, ok := strings.Cut(kv, "="); ok {
			vars[k] = v
		}
	}
	for k, v := range extra {
		vars[k] = v
	}
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "TMPDIR=" + os.TempDir()}
	for k, v := range vars {
		env = append(env, k+"="+v)
	}
	logFile, err := os.CreateTemp("", "soak-proxy-*.log")
	if err != nil {
		t.Fatal(err)
	}
	argv := append(slices.Clone(wrapper), bin)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// The proxy dies with the test binary, whatever happens to it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proxyProc{URL: "http://" + addr, LogPath: logFile.Name(), cmd: cmd, done: make(chan struct{})}
	go func() { p.waitErr = cmd.Wait(); _ = logFile.Close(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = cmd.Process.Kill()
			<-p.done
		}
	})
	startUp := 30 * time.Second
	if wrapper != nil {
		startUp = 2 * time.Minute
	}
	apptest.Eventually(t, startUp, func() bool {
		select {
		case <-p.done:
			t.Fatalf("proxy exited during start-up: %v\n%s", p.waitErr, p.logTail(4096))
		default:
		}
		resp, err := http.Get(p.URL + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	}, "proxy not healthy (log %s)", p.LogPath)
	t.Logf("proxy pid %d on %s, log %s", cmd.Process.Pid, p.URL, p.LogPath)
	return p
}

func (p *proxyProc) pid() int { return p.cmd.Process.Pid }

// stop sends SIGTERM and waits for a graceful exit.
func (p *proxyProc) stop(t *testing.T) (exitCode int, took time.Duration) {
	t.Helper()
	start := time.Now()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(60 * time.Second):
		t.Errorf("proxy did not exit within 60s of SIGTERM")
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	return p.cmd.ProcessState.ExitCode(), time.Since(start)
}

func (p *proxyProc) logTail(n int) string {
	b, _ := os.ReadFile(p.LogPath)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// logSummary counts the proxy's log lines by level and message, most
// frequent first.
func (p *proxyProc) logSummary() []string {
	f, err := os.Open(p.LogPath)
	if err != nil {
		return []string{err.Error()}
	}
	defer f.Close()
	counts := map[string]int{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		level, msg := field(line, "level="), field(line, "msg=")
		counts[level+" "+msg]++
	}
	out := make([]string, 0, len(counts))
	for k, v := range counts {
		out = append(out, fmt.Sprintf("%8d  %s", v, k))
	}
	slices.Sort(out)
	slices.Reverse(out)
	return out
}

// field reads one value of a slog text line: bare or quoted.
func field(line, name string) string {
	i := strings.Index(line, name)
	if i < 0 {
		return ""
	}
	rest := line[i+len(name):]
	if strings.HasPrefix(rest, `"`) {
		if s, err := strconv.QuotedPrefix(rest); err == nil {
			u, _ := strconv.Unquote(s)
			return u
		}
	}
	if j := strings.IndexByte(rest, ' '); j >= 0 {
		return rest[:j]
	}
	return rest
}

// ---------------------------------------------------------------------------
// Measuring the proxy process.

// sample is one look at the proxy process.
type sample struct {
	At         time.Time
	RSS        int64 // bytes, VmRSS from /proc/<pid>/status
	Threads    int
	FDs        int
	Goroutines int
	HeapInuse  int64   // go_memstats_heap_inuse_bytes
	CPU        float64 // process_cpu_seconds_total
	GCs        int     // garbage collections so far
	NextGC     int64   // heap goal; about twice the heap live at the last GC (GOGC=100)
	Metrics    promText
}

func (p *proxyProc) sample(t *testing.T) sample {
	t.Helper()
	s := sample{At: time.Now()}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.pid()))
	if err != nil {
		t.Errorf("read /proc status: %v", err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		name, val, _ := strings.Cut(line, ":")
		f := strings.Fields(val)
		if len(f) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(f[0], 10, 64)
		switch name {
		case "VmRSS":
			s.RSS = n << 10
		case "Threads":
			s.Threads = int(n)
		}
	}
	if fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.pid())); err == nil {
		s.FDs = len(fds)
	}
	m, err := scrape(p.URL + "/metrics")
	if err != nil {
		t.Errorf("scrape metrics: %v", err)
	}
	s.Metrics = m
	s.Goroutines = int(m.get("go_goroutines"))
	s.HeapInuse = int64(m.get("go_memstats_heap_inuse_bytes"))
	s.CPU = m.get("process_cpu_seconds_total")
	s.GCs = int(m.get("go_gc_duration_seconds_count"))
	s.NextGC = int64(m.get("go_memstats_next_gc_bytes"))
	return s
}

func (s sample) String() string {
	return fmt.Sprintf("rss %s, heap in use %s, goroutines %d, threads %d, fds %d",
		mib(s.RSS), mib(s.HeapInuse), s.Goroutines, s.Threads, s.FDs)
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// promText is a scraped Prometheus text exposition: series → value, the
// series written as name{labels} exactly as exported.
type promText map[string]float64

var metricsClient = &http.Client{Timeout: 10 * time.Second}

func scrape(url string) (promText, error) {
	resp, err := metricsClient.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return nil, fmt.Errorf("metrics: status %d", resp.StatusCode)
	}
	m := promText{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		series, value := line, ""
		if i := strings.LastIndexByte(line, '}'); i >= 0 {
			series, value = line[:i+1], strings.TrimSpace(line[i+1:])
		} else if i := strings.IndexByte(line, ' '); i >= 0 {
			series, value = line[:i], strings.TrimSpace(line[i+1:])
		}
		if f := strings.Fields(value); len(f) > 0 {
			v, err := strconv.ParseFloat(f[0], 64)
			if err == nil {
				m[series] = v
			}
		}
	}
	return m, sc.Err()
}

// get is an unlabelled series.
func (m promText) get(name string) float64 { return m[name] }

// averageBatch is the calls per statement of the claims' or completions'
// batches (kind "claim" or "completion") so far.
func (m promText) averageBatch(kind string) float64 {
	label := `{kind="` + kind + `"}`
	return m["proxy_idempotency_batch_calls_total"+label] / max(m["proxy_idempotency_batch_statements_total"+label], 1)
}

// sum adds the series of name whose labels contain every filter.
func (m promText) sum(name string, filters ...string) float64 {
	var total float64
	for series, v := range m {
		n, labels, _ := strings.Cut(series, "{")
		if n != name {
			continue
		}
		ok := true
		for _, f := range filters {
			if !strings.Contains(labels, f) {
				ok = false
			}
		}
		if ok {
			total += v
		}
	}
	return total
}

// byLabel sums name per value of one label, for reports.
func (m promText) byLabel(name, label string) map[string]float64 {
	out := map[string]float64{}
	for series, v := range m {
		n, labels, _ := strings.Cut(series, "{")
		if n != name {
			continue
		}
		val := "?"
		if i := strings.Index(labels, label+`="`); i >= 0 {
			val, _, _ = strings.Cut(labels[i+len(label)+2:], `"`)
		}
		out[val] += v
	}
	return out
}

// ---------------------------------------------------------------------------
// The lean fake upstream.

// upstream answers chat completions like OpenAI, cheaply and without
// keeping requests: JSON with usage, or SSE when the body asks for a
// stream. Every execution gets a sequence number that appears in its
// response (the completion id), so a second execution is never mistaken
// for a replay. Steering headers (the proxy forwards them):
//
//	X-Soak-Status: 500         answer with this status and an OpenAI error body
//	X-Soak-Events: 10          SSE content events (default 4)
//	X-Soak-Interval-Ms: 5      pause between SSE events (default 2)
//
// It counts executions per Idempotency-Key of this run (keys
// "<prefix><n>"), and of those the forced failures.
type upstream struct {
	*httptest.Server
	prefix string

	execs       atomic.Int64 // every request that reached the handler
	forcedFails atomic.Int64
	streams     atomic.Int64 // SSE responses started
	streamsDone atomic.Int64 // SSE responses written to their end
	cancelled   atomic.Int64 // SSE responses whose client (the proxy) went away
	inflight    atomic.Int64

	mu      sync.Mutex
	keys    map[uint64]keyExecs
	foreign int64 // keyed requests whose key is not of this run's format
}

// keyExecs is what the upstream saw of one Idempotency-Key.
type keyExecs struct {
	execs, fails uint32
}

func newUpstream(t *testing.T, prefix string) *upstream {
	u := &upstream{prefix: prefix, keys: map[uint64]keyExecs{}}
	u.Server = httptest.NewServer(http.HandlerFunc(u.serve))
	t.Cleanup(func() { u.Server.CloseClientConnections(); u.Server.Close() })
	return u
}

// keyStats returns the executions seen for key number n.
func (u *upstream) keyStats(n uint64) keyExecs {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.keys[n]
}

func (u *upstream) allKeys() (map[uint64]keyExecs, int64) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return maps.Clone(u.keys), u.foreign
}

func (u *upstream) countKey(key string, failed bool) {
	rest, ok := strings.CutPrefix(key, u.prefix)
	n, err := strconv.ParseUint(rest, 10, 64)
	u.mu.Lock()
	defer u.mu.Unlock()
	if !ok || err != nil {
		u.foreign++
		return
	}
	e := u.keys[n]
	e.execs++
	if failed {
		e.fails++
	}
	u.keys[n] = e
}

func (u *upstream) serve(w http.ResponseWriter, r *http.Request) {
	u.inflight.Add(1)
	defer u.inflight.Add(-1)
	body, _ := io.ReadAll(r.Body)
	seq := u.execs.Add(1)
	status, _ := strconv.Atoi(r.Header.Get("X-Soak-Status"))
	if key := r.Header.Get("Idempotency-Key"); key != "" {
		u.countKey(key, status >= 400)
	}
	w.Header().Set("X-Request-Id", "req_soak_"+strconv.FormatInt(seq, 10))
	w.Header().Set("Openai-Processing-Ms", "3")
	if status >= 400 {
		u.forcedFails.Add(1)
		b := []byte(`{"error":{"message":"forced failure","type":"server_error","param":null,"code":"soak_forced_` + strconv.Itoa(status) + `"}}`)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.WriteHeader(status)
		_, _ = w.Write(b)
		return
	}
	id := "chatcmpl-soak-" + strconv.FormatInt(seq, 10)
	if !bytes.Contains(body, []byte(`"stream":true`)) {
		b := []byte(`{"id":"` + id + `","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from execution ` +
			strconv.FormatInt(seq, 10) + `."},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}`)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		_, _ = w.Write(b)
		return
	}
	events, interval := 4, 2*time.Millisecond
	if n, err := strconv.Atoi(r.Header.Get("X-Soak-Events")); err == nil && n > 0 {
		events = n
	}
	if ms, err := strconv.Atoi(r.Header.Get("X-Soak-Interval-Ms")); err == nil && ms >= 0 {
		interval = time.Duration(ms) * time.Millisecond
	}
	u.streams.Add(1)
	w.Header().Set("Content-Type", "text/event-stream; charset=utf-8")
	w.WriteHeader(200)
	fl := w.(http.Flusher)
	send := func(data string) bool {
		_, err := io.WriteString(w, "data: "+data+"\n\n")
		fl.Flush()
		return err == nil
	}
	chunk := `{"id":"` + id + `","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,`
	var timer *time.Timer
	for i := range events {
		if !send(chunk + `"delta":{"content":"tok` + strconv.Itoa(i) + ` "},"finish_reason":null}]}`) {
			u.cancelled.Add(1)
			return
		}
		if interval > 0 {
			if timer == nil {
				timer = time.NewTimer(interval)
			} else {
				timer.Reset(interval)
			}
			select {
			case <-timer.C:
			case <-r.Context().Done():
				u.cancelled.Add(1)
				return
			}
		} else if r.Context().Err() != nil {
			u.cancelled.Add(1)
			return
		}
	}
	send(chunk + `"delta":{},"finish_reason":"stop"}]}`)
	send(`{"id":"` + id + `","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":` +
		strconv.Itoa(events) + `,"total_tokens":` + strconv.Itoa(events+5) + `}}`)
	if send("[DONE]") {
		u.streamsDone.Add(1)
	} else {
		u.cancelled.Add(1)
	}
}

// ---------------------------------------------------------------------------
// The client.

// client talks to one base URL over keep-alive connections.
type client struct {
	hc  *http.Client
	url string // the chat completions endpoint
}

func newClient(url string, conns int) *client {
	return &client{url: url, hc: &http.Client{Transport: &http.Transport{
		MaxIdleConns: conns, MaxIdleConnsPerHost: conns, IdleConnTimeout: 90 * time.Second,
		DisableCompression: true, ResponseHeaderTimeout: 60 * time.Second,
	}}}
}

func (c *client) closeIdle() { c.hc.CloseIdleConnections() }

// answer is what one request got.
type answer struct {
	start, end time.Time
	headers    bool // a response arrived (the proxy answered)
	status     int
	replayed   bool
	sse        bool
	body       []byte
	code       string // error.code of an error body
	firstEvent []byte // set when the request was cut after its first event
	events     int    // SSE events read (streams test)
	maxGap     time.Duration
	// firstEventAfter is the time from sending to the first whole event
	// (streams test).
	firstEventAfter time.Duration
	err             error // transport or read error
}

func (a answer) latency() time.Duration { return a.end.Sub(a.start) }

// header builds request headers for one request.
func header(kind, key string, extra ...string) http.Header {
	h := http.Header{
		"Authorization": {"Bearer " + clientKey},
		"Content-Type":  {"application/json"},
		"User-Agent":    {"soak/" + kind},
	}
	if key != "" {
		h.Set("Idempotency-Key", key)
	}
	for i := 0; i+1 < len(extra); i += 2 {
		h.Set(extra[i], extra[i+1])
	}
	return h
}

// post sends one request. cut reads an SSE answer up to its first event and
// then goes away, as a client that disconnects mid-stream. timing records
// the gaps between events (for the streams test).
func (c *client) post(ctx context.Context, body string, h http.Header, cut, timing bool) answer {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	a := answer{start: time.Now()}
	defer func() { a.end = time.Now() }()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, strings.NewReader(body))
	if err != nil {
		a.err = err
		a.end = time.Now()
		return a
	}
	req.Header = h
	resp, err := c.hc.Do(req)
	if err != nil {
		a.err = err
		a.end = time.Now()
		return a
	}
	defer resp.Body.Close()
	a.headers = true
	a.status = resp.StatusCode
	a.replayed = resp.Header.Get("Idempotent-Replayed") == "true"
	a.sse = strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream")
	switch {
	case cut && a.sse && a.status == 200:
		br := bufio.NewReader(resp.Body)
		var ev []byte
		for !bytes.HasSuffix(ev, []byte("\n\n")) {
			line, err := br.ReadSlice('\n')
			ev = append(ev, line...)
			if err != nil {
				a.err = err
				break
			}
		}
		a.firstEvent = ev
		cancel() // go away mid-stream: the transport closes the connection
	case timing && a.sse:
		br := bufio.NewReader(resp.Body)
		last := time.Now()
		for {
			line, err := br.ReadSlice('\n')
			a.body = append(a.body, line...)
			if len(line) == 1 && line[0] == '\n' {
				now := time.Now()
				if a.events == 0 {
					a.firstEventAfter = now.Sub(a.start)
				} else if now.Sub(last) > a.maxGap {
					a.maxGap = now.Sub(last)
				}
				a.events++
				last = now
			}
			if err != nil {
				if !errors.Is(err, io.EOF) {
					a.err = err
				}
				break
			}
		}
	default:
		a.body, a.err = io.ReadAll(resp.Body)
	}
	a.end = time.Now()
	if a.status >= 400 {
		var e struct {
			Error struct {
				Code string `json:"code"`
			} `json:"error"`
		}
		if json.Unmarshal(a.body, &e) == nil {
			a.code = e.Error.Code
		}
	}
	return a
}

// errClass names a transport error without addresses or ports, so the
// report groups them.
func errClass(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "cancelled"
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "unexpected EOF"
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, io.EOF):
		return "EOF"
	}
	s := err.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 {
		s = s[i+2:]
	}
	return s
}

// ---------------------------------------------------------------------------
// Statistics.

// percentiles formats p50/p90/p99/max of ds.
func percentiles(ds []time.Duration) string {
	if len(ds) == 0 {
		return "-"
	}
	slices.Sort(ds)
	at := func(q float64) time.Duration {
		i := int(math.Ceil(q*float64(len(ds)))) - 1
		return ds[max(0, min(i, len(ds)-1))]
	}
	r := func(d time.Duration) string { return d.Round(10 * time.Microsecond).String() }
	return fmt.Sprintf("p50 %s  p90 %s  p99 %s  max %s", r(at(.50)), r(at(.90)), r(at(.99)), r(ds[len(ds)-1]))
}

// ---------------------------------------------------------------------------
// PostgreSQL.

// openDB opens the test's schema for accounting queries.
func openDB(t *testing.T, url string) *sql.DB {
	t.Helper()
	db, err := sql.Open("pgx", url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

func queryInt(t *testing.T, db *sql.DB, q string, args ...any) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var n int64
	if err := db.QueryRowContext(ctx, q, args...).Scan(&n); err != nil {
		t.Errorf("%s: %v", q, err)
	}
	return n
}

// pgCluster is the local cluster's version directory under /etc/postgresql.
func pgCluster() (string, error) {
	entries, err := os.ReadDir("/etc/postgresql")
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		if e.IsDir() {
			return e.Name(), nil
		}
	}
	return "", errors.New("no cluster under /etc/postgresql")
}

func pgCtl(action string) error {
	version, err := pgCluster()
	if err != nil {
		return err
	}
	out, err := exec.Command("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action).CombinedOutput()
	if err != nil {
		return fmt.Errorf("pg_ctlcluster %s: %v: %s", action, err, out)
	}
	return nil
}

func pgReady() bool {
	return exec.Command("pg_isready", "-q", "-h", "127.0.0.1").Run() == nil
}

// waitPGReady polls pg_isready until it answers or d passes.
func waitPGReady(d time.Duration) bool {
	deadline := time.Now().Add(d)
	for !pgReady() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
	return true
}

// ensurePGRunning starts the local cluster if a restart left it down.
func ensurePGRunning(t *testing.T) {
	if pgReady() {
		return
	}
	t.Logf("PostgreSQL is not answering at the end of the test: starting it")
	if err := pgCtl("start"); err != nil {
		t.Errorf("%v", err)
	}
	if !waitPGReady(30 * time.Second) {
		t.Errorf("PostgreSQL still not ready: start it with pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start")
	}
}

// isLocalDB reports whether the database URL points at this machine, the
// only case where the soak may restart it.
func isLocalDB(url string) bool {
	return strings.Contains(url, "@127.0.0.1:") || strings.Contains(url, "@localhost:") || strings.Contains(url, "@127.0.0.1/") || strings.Contains(url, "@localhost/")
}

// afterGCs samples the proxy once it has collected garbage n times since
// s. After one collection heap in use is live data plus what sync.Pools
// hold (fasthttp and Fiber pool buffers and contexts); pools are emptied
// only by the second. An idle Go program collects only every 2 minutes, so
// the collections are brought on by allocation: each scrape of /metrics
// allocates some 150 KB in the proxy and touches neither the database nor
// the request log.
func (p *proxyProc) afterGCs(t *testing.T, s sample, n int) sample {
	t.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	for {
		now := p.sample(t)
		if now.GCs >= s.GCs+n || time.Now().After(deadline) {
			metricsClient.CloseIdleConnections()
			time.Sleep(time.Second)
			return p.sample(t)
		}
		for range 20 {
			if _, err := scrape(p.URL + "/metrics"); err != nil {
				t.Errorf("scrape: %v", err)
			}
		}
	}
}

// settle lets the proxies go idle before a measurement: the clients'
// connections closed and the servers' idle workers (fasthttp keeps them
// 10s) gone.
func settle(d time.Duration, cs ...*client) {
	for _, c := range cs {
		c.closeIdle()
	}
	time.Sleep(d)
}
