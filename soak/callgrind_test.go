//go:build linux

package soak

// TestInstructionsBesideNginx: the user-space instructions the proxy and
// nginx execute per request, counted by valgrind's callgrind.
//
//	SOAK=1 go test ./soak/ -run InstructionsBesideNginx -v
//
// CPU seconds on a shared machine move with the neighbours (one round of
// TestVersusNginx can be off by a third); an instruction count does not:
// the same binary under the same load counts the same within about 2%
// whatever else the machine does. It misses what TestVersusNginx sees,
// the kernel's share (system calls, the loopback's TCP work, wake-ups:
// about half of either server's CPU), so it is the figure for changes to
// the proxy's own code, beside the CPU ratios, not instead of them.
//
// nginx runs nginxConf as one process (master_process off, one worker),
// and Fiber's proxy middleware alone (testdata/bareproxy) and the proxy as
// in TestVersusNginx (PostgreSQL), each under `valgrind
// --tool=callgrind`, about fifty times slower. For each run the counters
// are zeroed after a warm-up (callgrind_control -z), SOAK_CG_REQUESTS
// (2000) small chat completions are sent from SOAK_CG_CONNECTIONS (8)
// keep-alive connections, and the counts are dumped (callgrind_control
// -d). The proxy's Go runtime runs with GODEBUG=asyncpreemptoff=1: the
// signals of asynchronous preemption trip valgrind 3.19 (an assertion in
// its signal handling). It skips without valgrind or nginx (Debian:
// apt-get install -y valgrind nginx). SOAK_CG_DIR=<dir> keeps the dumps
// there (named after the run's process and pid), to read with
// callgrind_annotate: its self costs are right, its inclusive ones are
// not (callgrind follows calls across the Go scheduler's goroutine
// switches).

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

func TestInstructionsBesideNginx(t *testing.T) {
	requireSoak(t)
	for _, tool := range []string{"valgrind", "callgrind_control"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed (Debian: apt-get install -y valgrind)", tool)
		}
	}
	nginxBin := nginxPath(t)
	requests := envInt(t, "SOAK_CG_REQUESTS", 2000)
	conns := envInt(t, "SOAK_CG_CONNECTIONS", 8)

	dbURL := testdb.PostgresURL(t)
	up := newUpstream(t, "cg-")
	bin := buildProxy(t)
	outDir := os.Getenv("SOAK_CG_DIR")
	if outDir == "" {
		outDir = t.TempDir()
	} else if err := os.MkdirAll(outDir, 0o755); err != nil {
		t.Fatal(err)
	}
	callgrind := func(name string) []string {
		return []string{"valgrind", "--tool=callgrind", "--callgrind-out-file=" + filepath.Join(outDir, name+".%p")}
	}
	oneProcess := strings.Replace(nginxConf, "worker_processes auto;", "worker_processes 1;\nmaster_process off;", 1)
	ng := startNginxUnder(t, callgrind("nginx"), nginxBin, strings.TrimPrefix(up.URL, "http://"), oneProcess)
	px := startProxyUnder(t, callgrind("proxy"), bin, up.URL, dbURL, map[string]string{"GODEBUG": "asyncpreemptoff=1"})
	bare := startBare(t, callgrind("bareproxy"), up.URL)

	runs := []struct {
		name  string
		url   string
		pid   int
		keyed bool
	}{
		{"small JSON: nginx", ng.URL, ng.cmd.Process.Pid, false},
		{"small JSON: Fiber's proxy middleware alone (testdata/bareproxy)", bare.URL, bare.pid(), false},
		{"small JSON: the proxy, no key", px.URL, px.pid(), false},
		{"small JSON: the proxy, unique Idempotency-Key each, PostgreSQL", px.URL, px.pid(), true},
	}
	perRequest := make([]float64, len(runs))
	for i, run := range runs {
		c := newClient(run.url+"/v1/chat/completions", conns)
		send(t, c, fmt.Sprintf("cg-warm-%d-", i), requests/5, conns, run.keyed)
		callgrindControl(t, "-z", run.pid)
		send(t, c, fmt.Sprintf("cg-run-%d-", i), requests, conns, run.keyed)
		callgrindControl(t, "-d", run.pid)
		c.closeIdle()
		total, dump := lastDump(t, outDir, run.pid)
		perRequest[i] = float64(total) / float64(requests)
		if os.Getenv("SOAK_CG_DIR") != "" {
			t.Logf("%s: %s", run.name, dump)
		}
	}

	var b strings.Builder
	fmt.Fprintf(&b, "callgrind, %d requests from %d connections per run, %s\n\n", requests, conns, time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	b.WriteString("| | instructions per request | vs nginx |\n|---|---:|---:|\n")
	for i, run := range runs {
		fmt.Fprintf(&b, "| %s | %s | %.2f× |\n", run.name, thousands(perRequest[i]), perRequest[i]/perRequest[0])
	}
	t.Log("\n" + b.String())
}

// send posts n chat completions from conns goroutines; every one must
// succeed. keyed gives each a unique Idempotency-Key under prefix.
func send(t *testing.T, c *client, prefix string, n, conns int, keyed bool) {
	t.Helper()
	var next, failed atomic.Int64
	var wg sync.WaitGroup
	for range conns {
		wg.Go(func() {
			for i := next.Add(1); i <= int64(n); i = next.Add(1) {
				key := ""
				if keyed {
					key = prefix + strconv.FormatInt(i, 10)
				}
				if a := c.post(context.Background(), chatBody, header("cg", key), false, false); a.err != nil || a.status != 200 {
					if failed.Add(1) == 1 {
						t.Errorf("%s%d: %d %v %s", prefix, i, a.status, a.err, a.body)
					}
				}
			}
		})
	}
	wg.Wait()
	if f := failed.Load(); f > 0 {
		t.Fatalf("%d of %d requests failed", f, n)
	}
}

// callgrindControl zeroes (-z) or dumps (-d) the counters of the process
// pid runs under callgrind.
func callgrindControl(t *testing.T, action string, pid int) {
	t.Helper()
	if out, err := exec.Command("callgrind_control", action, strconv.Itoa(pid)).CombinedOutput(); err != nil {
		t.Fatalf("callgrind_control %s %d: %v\n%s", action, pid, err, out)
	}
}

// lastDump finds the process's latest dump (callgrind numbers them
// <name>.<pid>.1, .2, …) and its instruction total, once callgrind has
// written it.
func lastDump(t *testing.T, dir string, pid int) (total int64, path string) {
	t.Helper()
	apptest.Eventually(t, 30*time.Second, func() bool {
		files, _ := filepath.Glob(filepath.Join(dir, fmt.Sprintf("*.%d.*", pid)))
		last, lastN := "", 0
		for _, f := range files {
			if n, err := strconv.Atoi(f[strings.LastIndexByte(f, '.')+1:]); err == nil && n > lastN {
				last, lastN = f, n
			}
		}
		total, path = dumpTotal(last), last
		return total > 0
	}, "no callgrind dump for pid %d in %s", pid, dir)
	return total, path
}

// dumpTotal is the "totals:" line of a callgrind dump, 0 until it is
// written whole.
func dumpTotal(path string) int64 {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "totals: "); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n
		}
	}
	return 0
}
