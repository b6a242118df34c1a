//go:build linux

package soak

// TestWrkThroughput: wrk against the fake upstream directly and through the
// proxy binary, for a small JSON chat completion request.
//
//	SOAK=1 go test ./soak/ -run Wrk -v -timeout 20m
//
// Four runs of `wrk -t2 -c64 -d30s --latency -s soak/wrk_chat.lua`: the
// upstream directly, the proxy, the proxy with a unique Idempotency-Key per
// request (WRK_KEYED=1: a claim and a completion in PostgreSQL each), and
// the proxy with one Idempotency-Key for all (WRK_KEY=…, executed once
// beforehand: every request is a replay of one hot key, as in a retry
// storm).
// The exact command lines are logged. Everything shares the machine: the
// upstream runs in this test process, and wrk, the proxy and PostgreSQL
// beside it. It needs wrk (Debian: apt-get install -y wrk) and skips
// without it. SOAK_WRK_DURATION (30s), SOAK_WRK_CONNECTIONS (64) and
// SOAK_WRK_THREADS (2) change the load. It fails on non-2xx answers or
// socket errors.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// wrkResult is what one wrk run printed.
type wrkResult struct {
	rps                  float64
	requests             int64
	avg, stdev, max      string
	p50, p75, p90, p99   string
	non2xx               int64
	socketErrors         string
	cpuProxy             float64 // proxy CPU seconds during the run
	rssBefore, rssAfter  int64
	droppedLog, wroteLog float64 // request log records during the run
}

var (
	reRPS      = regexp.MustCompile(`Requests/sec:\s+([\d.]+)`)
	reRequests = regexp.MustCompile(`(\d+) requests in`)
	reLatency  = regexp.MustCompile(`Latency\s+(\S+)\s+(\S+)\s+(\S+)`)
	rePct      = regexp.MustCompile(`(?m)^\s+(50|75|90|99)%\s+(\S+)`)
	reNon2xx   = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
	reSocket   = regexp.MustCompile(`Socket errors: (.*)`)
)

func parseWrk(out string) (wrkResult, error) {
	var r wrkResult
	m := reRPS.FindStringSubmatch(out)
	if m == nil {
		return r, fmt.Errorf("no Requests/sec in wrk output")
	}
	r.rps, _ = strconv.ParseFloat(m[1], 64)
	if m := reRequests.FindStringSubmatch(out); m != nil {
		r.requests, _ = strconv.ParseInt(m[1], 10, 64)
	}
	if m := reLatency.FindStringSubmatch(out); m != nil {
		r.avg, r.stdev, r.max = m[1], m[2], m[3]
	}
	for _, m := range rePct.FindAllStringSubmatch(out, -1) {
		switch m[1] {
		case "50":
			r.p50 = m[2]
		case "75":
			r.p75 = m[2]
		case "90":
			r.p90 = m[2]
		case "99":
			r.p99 = m[2]
		}
	}
	if m := reNon2xx.FindStringSubmatch(out); m != nil {
		r.non2xx, _ = strconv.ParseInt(m[1], 10, 64)
	}
	if m := reSocket.FindStringSubmatch(out); m != nil {
		r.socketErrors = m[1]
	}
	return r, nil
}

func TestWrkThroughput(t *testing.T) {
	requireSoak(t)
	wrk, err := exec.LookPath("wrk")
	if err != nil {
		t.Skip("wrk is not installed (Debian: apt-get install -y wrk)")
	}
	d := envDuration(t, "SOAK_WRK_DURATION", 30*time.Second)
	conns := envInt(t, "SOAK_WRK_CONNECTIONS", 64)
	threads := envInt(t, "SOAK_WRK_THREADS", 2)
	script, err := filepath.Abs("wrk_chat.lua")
	if err != nil {
		t.Fatal(err)
	}

	dbURL := testdb.PostgresURL(t)
	up := newUpstream(t, "wrk-")
	bin := buildProxy(t)
	px := startProxy(t, bin, up.URL, dbURL, nil)

	// The replay run's key is executed once beforehand, so that every
	// request of the run is a replay rather than a 409 while it executes.
	replayKey := fmt.Sprintf("wrk-replay-%d", time.Now().UnixNano())
	wrkBody := `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}` // as in wrk_chat.lua
	if a := newClient(px.URL+"/v1/chat/completions", 1).post(context.Background(), wrkBody, header("wrk", replayKey), false, false); a.status != 200 {
		t.Fatalf("executing the replay key: %d %s %v", a.status, a.code, a.err)
	}

	runs := []struct {
		name, url string
		env       []string
	}{
		{"direct (upstream)", up.URL + "/chat/completions", nil},
		{"proxied", px.URL + "/v1/chat/completions", nil},
		{"proxied, keyed", px.URL + "/v1/chat/completions", []string{"WRK_KEYED=1"}},
		{"proxied, replays", px.URL + "/v1/chat/completions", []string{"WRK_KEY=" + replayKey}},
	}
	results := make([]wrkResult, len(runs))
	for i, run := range runs {
		time.Sleep(3 * time.Second) // let the previous run's connections and log queue settle
		args := []string{"-t" + strconv.Itoa(threads), "-c" + strconv.Itoa(conns), "-d" + d.String(), "--latency", "-s", script, run.url}
		env := append([]string{"WRK_CLIENT_KEY=" + clientKey}, run.env...)
		t.Logf("%s: $ %s wrk %s", run.name, strings.Join(env, " "), strings.Join(args, " "))
		before := px.sample(t)
		cmd := exec.Command(wrk, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("wrk: %v\n%s", err, out)
		}
		after := px.sample(t)
		t.Logf("%s:\n%s", run.name, out)
		r, err := parseWrk(string(out))
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		r.cpuProxy = after.CPU - before.CPU
		r.rssBefore, r.rssAfter = before.RSS, after.RSS
		r.droppedLog = after.Metrics.get("proxy_log_dropped_total") - before.Metrics.get("proxy_log_dropped_total")
		r.wroteLog = after.Metrics.get("proxy_log_written_total") - before.Metrics.get("proxy_log_written_total")
		results[i] = r
		if r.non2xx > 0 {
			t.Errorf("%s: %d non-2xx answers", run.name, r.non2xx)
		}
		if r.socketErrors != "" {
			t.Errorf("%s: socket errors: %s", run.name, r.socketErrors)
		}
	}
	time.Sleep(3 * time.Second)
	final := px.sample(t)

	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "WRK -t%d -c%d -d%s\treq/s\tp50\tp75\tp90\tp99\tavg\tmax\trequests\tproxy CPU s\tproxy RSS after\tlog written / dropped\t\n", threads, conns, d)
	for i, run := range runs {
		r := results[i]
		cpu, rss, logs := "-", "-", "-"
		if i > 0 {
			cpu, rss = fmt.Sprintf("%.1f", r.cpuProxy), mib(r.rssAfter)
			logs = fmt.Sprintf("%.0f / %.0f", r.wroteLog, r.droppedLog)
		}
		fmt.Fprintf(tw, "%s\t%.0f\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t\n", run.name, r.rps, r.p50, r.p75, r.p90, r.p99, r.avg, r.max, r.requests, cpu, rss, logs)
	}
	_ = tw.Flush()
	fmt.Fprintf(&b, "proxy after the runs: %s; request log written %.0f, dropped %.0f\n", final,
		final.Metrics.get("proxy_log_written_total"), final.Metrics.get("proxy_log_dropped_total"))
	t.Log("\n" + b.String())
	if code, _ := px.stop(t); code != 0 {
		t.Errorf("proxy exited with %d after SIGTERM", code)
	}
}
