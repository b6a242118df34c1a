//go:build linux

package soak

// TestVersusNginx: the proxy and nginx side by side in one run, in front of
// the same fake upstream, under the same wrk load, with the ratios.
//
//	SOAK=1 go test ./soak/ -run VersusNginx -v -timeout 10m
//
// Six runs of `wrk -t2 -c64 -d10s --latency`, each logged as a command
// line: a small JSON chat completion (wrk_chat.lua) through nginx, through
// Fiber's proxy middleware alone (testdata/bareproxy: the stack's floor)
// and through the proxy, the same through the proxy with a unique
// Idempotency-Key per request (WRK_KEYED=1, PostgreSQL), and a stream of 20
// SSE chunks (wrk_stream.lua) through nginx and through the proxy. For each
// it reports requests/s, latency p50/p99, the server's CPU seconds per 10k
// requests and the ratio to nginx's run of the same kind. The proxy's CPU is
// process_cpu_seconds_total from its /metrics; nginx's is utime+stime from
// /proc/<pid>/stat of its master and worker processes.
//
// nginx (Debian: apt-get install -y nginx) runs from a configuration
// written into a temporary directory (see nginxConf), as a child process
// stopped at the end of the test. The test skips without wrk or nginx, and
// fails on non-2xx answers or socket errors; timings are reported, never
// asserted. SOAK_WRK_DURATION (10s here), SOAK_WRK_CONNECTIONS (64) and
// SOAK_WRK_THREADS (2) change the load; SOAK_ROUNDS (1) repeats the six
// runs and adds the median ratios. Everything shares the machine: wrk,
// nginx, the proxy, PostgreSQL and the upstream in this test process.

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// nginxConf is nginx configured as a plain reverse proxy equivalent to the
// proxy's forwarding: loopback only, a keep-alive pool towards the upstream
// (HTTP/1.1, Connection cleared), no response buffering so SSE chunks pass
// as they come, no access log (the proxy's request log is part of what it
// costs, but nginx is the baseline of forwarding alone).
//
// worker_processes auto: one worker per core (2 on the test box), as the Go
// proxy uses every core. keepalive_requests is raised on both sides so that
// neither wrk's connections nor the upstream pool are recycled every 1,000
// requests (nginx's default), which the proxy does not do either.
const nginxConf = `worker_processes auto;
pid {{dir}}/nginx.pid;
error_log {{dir}}/error.log warn;

events {
	worker_connections 4096;
}

http {
	access_log off;
	client_body_temp_path {{dir}}/client_body;
	proxy_temp_path {{dir}}/proxy;
	fastcgi_temp_path {{dir}}/fastcgi;
	uwsgi_temp_path {{dir}}/uwsgi;
	scgi_temp_path {{dir}}/scgi;
	keepalive_requests 1000000;

	upstream mock {
		server {{upstream}};
		keepalive 128;
		keepalive_requests 1000000;
	}

	server {
		listen {{listen}};
		location /v1/ {
			proxy_pass http://mock/;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
			proxy_buffering off;
		}
	}
}
`

type nginxProc struct {
	URL  string
	dir  string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// nginxPath finds the nginx binary, or skips the test.
func nginxPath(t *testing.T) string {
	t.Helper()
	if bin, err := exec.LookPath("nginx"); err == nil {
		return bin
	}
	// Debian installs it in /usr/sbin, which a user's PATH may lack.
	if _, err := os.Stat("/usr/sbin/nginx"); err != nil {
		t.Skip("nginx is not installed (Debian: apt-get install -y nginx)")
	}
	return "/usr/sbin/nginx"
}

// startNginx runs nginx in the foreground (daemon off) with nginxConf on a
// free 127.0.0.1 port, in front of upstreamAddr (host:port), and waits until
// a chat completion passes through it.
func startNginx(t *testing.T, bin, upstreamAddr string) *nginxProc {
	t.Helper()
	return startNginxUnder(t, nil, bin, upstreamAddr, nginxConf)
}

// startNginxUnder is startNginx with configuration conf (nginxConf's
// placeholders), the binary run by a wrapper command (valgrind, say).
func startNginxUnder(t *testing.T, wrapper []string, bin, upstreamAddr, conf string) *nginxProc {
	t.Helper()
	dir := t.TempDir()
	// The workers run as nginx's default user (nobody) when the test runs as
	// root, and must reach the temp paths.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	conf = strings.NewReplacer("{{dir}}", dir, "{{upstream}}", upstreamAddr, "{{listen}}", addr).Replace(conf)
	confPath := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	// -e: the error log before the configuration is read, so nothing is
	// written under /var/log/nginx.
	args := []string{"-e", filepath.Join(dir, "error.log"), "-c", confPath, "-p", dir}
	if out, err := exec.Command(bin, append(args, "-t")...).CombinedOutput(); err != nil {
		t.Fatalf("nginx -t: %v\n%s\n%s", err, out, conf)
	}
	argv := append(append(slices.Clone(wrapper), bin), append(args, "-g", "daemon off;")...)
	cmd := exec.Command(argv[0], argv[1:]...)
	out, err := os.Create(filepath.Join(dir, "stdout.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	// Its own process group, so the workers can be ended with the master;
	// SIGTERM (nginx's fast shutdown, which ends the workers too) if the
	// test binary dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	n := &nginxProc{URL: "http://" + addr, dir: dir, cmd: cmd, done: make(chan struct{})}
	go func() { n.err = cmd.Wait(); _ = out.Close(); close(n.done) }()
	t.Cleanup(func() { n.stop(t) })

	c := newClient(n.URL+"/v1/chat/completions", 1)
	defer c.closeIdle()
	startUp := 15 * time.Second
	if wrapper != nil {
		startUp = time.Minute
	}
	apptest.Eventually(t, startUp, func() bool {
		select {
		case <-n.done:
			t.Fatalf("nginx exited during start-up: %v\n%s", n.err, n.errorLog())
		default:
		}
		return c.post(context.Background(), chatBody, header("nginx", ""), false, false).status == 200
	}, "nginx on %s does not pass a chat completion through\n%s", addr, n.errorLog())
	t.Logf("nginx pid %d on %s (workers %v), config and logs in %s", cmd.Process.Pid, n.URL, n.workers(), dir)
	return n
}

func (n *nginxProc) errorLog() string {
	b, _ := os.ReadFile(filepath.Join(n.dir, "error.log"))
	return string(b)
}

// stop asks for nginx's fast shutdown and, if it does not come, kills the
// whole process group.
func (n *nginxProc) stop(t *testing.T) {
	select {
	case <-n.done:
		return
	default:
	}
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.done:
	case <-time.After(10 * time.Second):
		t.Errorf("nginx did not exit within 10s of SIGTERM: killing its process group")
		_ = syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL)
		<-n.done
	}
}

// workers lists the master's child processes.
func (n *nginxProc) workers() []int {
	master := n.cmd.Process.Pid
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := procStat(pid); err == nil && st.ppid == master {
			pids = append(pids, pid)
		}
	}
	return pids
}

// cpuSeconds is the CPU time of the master and its workers so far.
func (n *nginxProc) cpuSeconds(t *testing.T) float64 {
	t.Helper()
	var total float64
	for _, pid := range append([]int{n.cmd.Process.Pid}, n.workers()...) {
		st, err := procStat(pid)
		if err != nil {
			t.Errorf("nginx CPU: %v", err)
			continue
		}
		total += st.cpu
	}
	return total
}

type procStatus struct {
	ppid int
	cpu  float64 // utime + stime, seconds
}

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat times: 100 on every
// Linux architecture Go supports (getconf CLK_TCK).
const clockTicks = 100

// procStat reads /proc/<pid>/stat. The command name (field 2) may hold
// spaces, so the fields are counted after its closing parenthesis: state is
// field 3, ppid 4, utime 14, stime 15.
func procStat(pid int) (procStatus, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStatus{}, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return procStatus{}, fmt.Errorf("/proc/%d/stat: unexpected format %q", pid, s)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return procStatus{}, fmt.Errorf("/proc/%d/stat: unexpected format %q", pid, s)
	}
	ppid, _ := strconv.Atoi(f[1])
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return procStatus{ppid: ppid, cpu: (utime + stime) / clockTicks}, nil
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return err.Error()
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return string(b)
	}
	return strings.Join(f[:3], " ")
}

func TestVersusNginx(t *testing.T) {
	requireSoak(t)
	wrk, err := exec.LookPath("wrk")
	if err != nil {
		t.Skip("wrk is not installed (Debian: apt-get install -y wrk)")
	}
	nginxBin := nginxPath(t)
	d := envDuration(t, "SOAK_WRK_DURATION", 10*time.Second)
	conns := envInt(t, "SOAK_WRK_CONNECTIONS", 64)
	threads := envInt(t, "SOAK_WRK_THREADS", 2)
	rounds := envInt(t, "SOAK_ROUNDS", 1)
	chatScript, err := filepath.Abs("wrk_chat.lua")
	if err != nil {
		t.Fatal(err)
	}
	streamScript, err := filepath.Abs("wrk_stream.lua")
	if err != nil {
		t.Fatal(err)
	}

	perfDir := os.Getenv("SOAK_PERF")
	if perfDir != "" {
		if _, err := exec.LookPath("perf"); err != nil {
			t.Fatalf("SOAK_PERF is set but perf is not installed (Debian: apt-get install -y linux-perf)")
		}
		if perfDir, err = filepath.Abs(perfDir); err == nil {
			err = os.MkdirAll(perfDir, 0o755)
		}
		if err != nil {
			t.Fatal(err)
		}
	}

	dbURL := testdb.PostgresURL(t)
	up := newUpstream(t, "nginx-")
	bin := buildProxy(t)
	px := startProxy(t, bin, up.URL, dbURL, nil)
	ng := startNginx(t, nginxBin, strings.TrimPrefix(up.URL, "http://"))
	bare := startBare(t, nil, up.URL)

	type server int
	const (
		viaNginx server = iota
		viaProxy
		viaBare
	)
	runs := []struct {
		name   string
		via    server
		script string
		env    []string
		vs     int // index of the nginx run this one is compared with
	}{
		{"small JSON: nginx", viaNginx, chatScript, nil, 0},
		{"small JSON: Fiber's proxy middleware alone (testdata/bareproxy)", viaBare, chatScript, nil, 0},
		{"small JSON: the proxy, no key", viaProxy, chatScript, nil, 0},
		{"small JSON: the proxy, unique Idempotency-Key each, PostgreSQL", viaProxy, chatScript, []string{"WRK_KEYED=1"}, 0},
		{"stream of 20 chunks: nginx", viaNginx, streamScript, nil, 4},
		{"stream of 20 chunks: the proxy", viaProxy, streamScript, nil, 4},
	}
	type result struct {
		wrkResult
		cpu float64 // the server's CPU seconds during the run
	}
	// Each round runs every kind once, nginx beside the proxy: neighbours
	// on a shared machine come and go within minutes, so one round's
	// ratios can be off by a third; the median of several holds.
	results := make([][]result, rounds)
	loadBefore := loadAvg()
	started := time.Now()
	for round := range rounds {
		results[round] = make([]result, len(runs))
		for i, run := range runs {
			time.Sleep(3 * time.Second) // let the previous run's connections and log queue settle
			base := map[server]string{viaNginx: ng.URL, viaProxy: px.URL, viaBare: bare.URL}[run.via]
			args := []string{"-t" + strconv.Itoa(threads), "-c" + strconv.Itoa(conns), "-d" + d.String(), "--latency", "-s", run.script, base + "/v1/chat/completions"}
			env := append([]string{"WRK_CLIENT_KEY=" + clientKey}, run.env...)
			t.Logf("round %d, %s: $ %s wrk %s", round+1, run.name, strings.Join(env, " "), strings.Join(args, " "))
			cpu := func() float64 {
				switch run.via {
				case viaProxy:
					return px.sample(t).CPU
				case viaBare:
					return bare.cpuSeconds(t)
				}
				return ng.cpuSeconds(t)
			}
			var perf *exec.Cmd
			if perfDir != "" && run.via == viaProxy {
				perf = startPerf(t, perfDir, round*len(runs)+i, px.pid())
			}
			execsBefore, streamsBefore := up.execs.Load(), up.streamsDone.Load()
			before := cpu()
			cmd := exec.Command(wrk, args...)
			cmd.Env = append(os.Environ(), env...)
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("wrk: %v\n%s", err, out)
			}
			after := cpu()
			execs, streams := up.execs.Load()-execsBefore, up.streamsDone.Load()-streamsBefore
			if perf != nil {
				stopPerf(t, perf)
			}
			t.Logf("round %d, %s:\n%s", round+1, run.name, out)
			r, err := parseWrk(string(out))
			if err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			results[round][i] = result{wrkResult: r, cpu: after - before}
			if r.non2xx > 0 {
				t.Errorf("%s: %d non-2xx answers", run.name, r.non2xx)
			}
			if r.socketErrors != "" {
				t.Errorf("%s: socket errors: %s", run.name, r.socketErrors)
			}
			if r.requests == 0 {
				t.Errorf("%s: no requests completed", run.name)
			}
			// Every answer wrk counted came from the upstream, and every stream
			// was written to its end ([DONE]): nothing was cached or cut short.
			if execs < r.requests {
				t.Errorf("%s: wrk counted %d answers, the upstream executed %d requests", run.name, r.requests, execs)
			}
			if run.script == streamScript && streams < r.requests {
				t.Errorf("%s: wrk counted %d streams, the upstream finished %d", run.name, r.requests, streams)
			}
		}
	}
	loadAfter := loadAvg()

	per10k := func(r result) float64 {
		if r.requests == 0 {
			return 0
		}
		return r.cpu / float64(r.requests) * 10000
	}
	var b strings.Builder
	fmt.Fprintf(&b, "wrk -t%d -c%d -d%s --latency, %d rounds, %s, %d cores; load average before %s, after %s\n",
		threads, conns, d, rounds, started.UTC().Format("2006-01-02 15:04 UTC"), runtime.NumCPU(), loadBefore, loadAfter)
	for round, rs := range results {
		fmt.Fprintf(&b, "\nround %d\n\n", round+1)
		b.WriteString("| | requests/s | p50 | p99 | CPU s per 10k requests | CPU per request vs nginx | requests/s vs nginx |\n")
		b.WriteString("|---|---:|---:|---:|---:|---:|---:|\n")
		for i, run := range runs {
			r, ref := rs[i], rs[run.vs]
			cpuRatio, rpsRatio := "1×", "1×"
			if i != run.vs {
				cpuRatio, rpsRatio = ratio(per10k(r), per10k(ref)), ratio(r.rps, ref.rps)
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %.2f s | %s | %s |\n",
				run.name, thousands(r.rps), r.p50, r.p99, per10k(r), cpuRatio, rpsRatio)
		}
	}
	if rounds > 1 {
		b.WriteString("\nmedian of the rounds' ratios\n\n| | CPU per request vs nginx | requests/s vs nginx |\n|---|---:|---:|\n")
		for i, run := range runs {
			if i == run.vs {
				continue
			}
			var cpus, rates []float64
			for _, rs := range results {
				cpus = append(cpus, per10k(rs[i])/per10k(rs[run.vs]))
				rates = append(rates, rs[i].rps/rs[run.vs].rps)
			}
			fmt.Fprintf(&b, "| %s | %.2f× | %.2f× |\n", run.name, median(cpus), median(rates))
		}
	}
	after := px.sample(t)
	fmt.Fprintf(&b, "\nnginx workers %d; proxy after the runs: %s; keyed statements' average batch: claims %.1f, completions %.1f\n",
		len(ng.workers()), after, after.Metrics.averageBatch("claim"), after.Metrics.averageBatch("completion"))
	t.Log("\n" + b.String())
	if code, _ := px.stop(t); code != 0 {
		t.Errorf("proxy exited with %d after SIGTERM", code)
	}
}

// startPerf samples the proxy's stacks with perf while a run lasts, into
// <dir>/proxy-run<i>.perf.data. Go keeps frame pointers, so -g gives whole
// Go call chains without DWARF unwinding; 499 Hz keeps perf's own cost small
// (it is in the CPU figures of a profiled run, so profile in a separate run).
func startPerf(t *testing.T, dir string, i, pid int) *exec.Cmd {
	t.Helper()
	data := filepath.Join(dir, fmt.Sprintf("proxy-run%d.perf.data", i))
	cmd := exec.Command("perf", "record", "-F", "499", "-g", "-p", strconv.Itoa(pid), "-o", data)
	logFile, err := os.Create(data + ".log")
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatalf("perf record: %v", err)
	}
	// Not waited for: perf attaches within milliseconds, and a profile
	// that misses them is the same profile.
	t.Logf("perf: profiling the proxy into %s; read it with: perf report -i %s --no-children --sort symbol", data, data)
	return cmd
}

// stopPerf ends a recording the way Ctrl-C does, so perf writes its data.
func stopPerf(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	_ = cmd.Process.Signal(syscall.SIGINT)
	err := cmd.Wait()
	// perf writes its data and then ends itself by the signal it got.
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGINT {
		err = nil
	}
	if err != nil {
		t.Errorf("perf record: %v", err)
	}
}

// median is the middle value of xs (the mean of the two middle ones for an
// even count).
func median(xs []float64) float64 {
	xs = slices.Sorted(slices.Values(xs))
	n := len(xs)
	if n%2 == 1 {
		return xs[n/2]
	}
	return (xs[n/2-1] + xs[n/2]) / 2
}

func ratio(a, b float64) string {
	if b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f×", a/b)
}

// thousands formats a rate as 12,345.
func thousands(f float64) string {
	s := strconv.FormatInt(int64(f+0.5), 10)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
