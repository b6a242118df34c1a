//go:build linux

package soak

import (
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
)

// bareProc is testdata/bareproxy: Fiber's proxy middleware forwarding
// /v1/* with the key swapped, and nothing of the proxy's own. Beside nginx
// and the proxy it shows what the stack (Fiber, fasthttp, the Go runtime)
// costs by itself.
type bareProc struct {
	URL string
	cmd *exec.Cmd
}

// startBare builds testdata/bareproxy and runs it (under wrapper, if not
// nil) on a free 127.0.0.1 port in front of upstreamURL, until /healthz
// answers.
func startBare(t *testing.T, wrapper []string, upstreamURL string) *bareProc {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "bareproxy")
	build := exec.Command("go", "build", "-o", bin, "./testdata/bareproxy")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./testdata/bareproxy: %v\n%s", err, out)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	argv := append(slices.Clone(wrapper), bin, "-listen", addr, "-upstream", upstreamURL, "-key", upstreamKey)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = os.Environ()
	if wrapper != nil { // valgrind, which asynchronous preemption's signals trip
		cmd.Env = append(cmd.Env, "GODEBUG=asyncpreemptoff=1")
	}
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
	b := &bareProc{URL: "http://" + addr, cmd: cmd}
	apptest.Eventually(t, 2*time.Minute, func() bool {
		resp, err := http.Get(b.URL + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	}, "bareproxy not answering on %s", b.URL)
	return b
}

func (b *bareProc) pid() int { return b.cmd.Process.Pid }

// cpuSeconds is the process's user and system CPU so far, all threads.
func (b *bareProc) cpuSeconds(t *testing.T) float64 {
	t.Helper()
	st, err := procStat(b.pid())
	if err != nil {
		t.Fatalf("bareproxy CPU: %v", err)
	}
	return st.cpu
}
