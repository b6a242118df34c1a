//go:build linux

package soak

// TestConcurrentStreamsMemory: what hundreds of concurrent SSE streams cost
// the proxy process, and that it gives the memory back.
//
//	SOAK=1 go test ./soak/ -run ConcurrentStreams -v -timeout 20m
//
// SOAK_STREAMS (500) streams run at once through the proxy binary, each
// SOAK_STREAM_EVENTS (100) events SOAK_STREAM_INTERVAL (200ms) apart, so
// about 20 s. It runs twice: without Idempotency-Key, then with one (the
// proxy then also captures each stream for replay and renews a lease). The
// proxy's RSS, heap, goroutines, threads and descriptors are sampled idle
// before, every 250 ms during (peak), and idle after; the per-stream cost is
// (peak - before) / streams.
//
// Bounds (failures): every stream arrives whole ([DONE], every event) with
// no gap between events over 2 s; at peak at most 3 goroutines per stream
// (one server connection worker, a lease renewer when keyed, slack) and at
// most 256 KiB of RSS per stream (the connection buffers are 32 KiB to read
// requests plus 16+16 KiB towards upstream, the rest is goroutine stacks and
// per-request state, so several times the expected cost); afterwards, idle,
// goroutines back within 20 of the baseline, and heap in use, once the
// proxy has collected garbage twice (until then the streams' garbage and the
// buffers parked in sync.Pools still count as in use; see afterGCs), within
// 16 MiB of it. RSS after is reported, not asserted: the Go runtime returns
// freed pages to the OS lazily.

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

func TestConcurrentStreamsMemory(t *testing.T) {
	requireSoak(t)
	n := envInt(t, "SOAK_STREAMS", 500)
	events := envInt(t, "SOAK_STREAM_EVENTS", 100)
	interval := envDuration(t, "SOAK_STREAM_INTERVAL", 200*time.Millisecond)

	dbURL := testdb.PostgresURL(t)
	prefix := fmt.Sprintf("streams-%d-", time.Now().UnixNano())
	up := newUpstream(t, prefix)
	bin := buildProxy(t)
	px := startProxy(t, bin, up.URL, dbURL, nil)
	c := newClient(px.URL+"/v1/chat/completions", n+16)

	// Warm-up: a little of everything, so the baseline is a proxy that has
	// served (pools filled, database connections open), not a fresh one.
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				key := ""
				if i%3 == 0 {
					key = prefix + "warm-" + strconv.Itoa(w) + "-" + strconv.Itoa(i)
				}
				body := chatBody
				if i%2 == 0 {
					body = streamBody
				}
				a := c.post(context.Background(), body, header("warm-up", key), false, false)
				if a.status != 200 {
					t.Errorf("warm-up: %d %s %v", a.status, a.code, a.err)
					return
				}
			}
		}()
	}
	wg.Wait()

	type phase struct {
		name                string
		before, peak, after sample
		late                sample // after the next garbage collection
		peakStreams         float64
		complete            int
		gaps                []time.Duration
		ttfe                []time.Duration
		took                time.Duration
	}
	var phases []*phase
	for _, keyed := range []bool{false, true} {
		ph := &phase{name: "unkeyed"}
		if keyed {
			ph.name = "keyed"
		}
		phases = append(phases, ph)
		settle(settleTime, c)
		ph.before = px.sample(t)
		ph.peak = ph.before
		t.Logf("%s: before %d streams, idle: %s", ph.name, n, ph.before)

		answers := make([]answer, n)
		var streams sync.WaitGroup
		start := time.Now()
		for i := range n {
			streams.Add(1)
			go func() {
				defer streams.Done()
				key := ""
				if keyed {
					key = prefix + ph.name + "-" + strconv.Itoa(i)
				}
				h := header("streams", key, "X-Soak-Events", strconv.Itoa(events), "X-Soak-Interval-Ms", strconv.Itoa(int(interval/time.Millisecond)))
				answers[i] = c.post(context.Background(), streamBody, h, false, true)
			}()
		}
		done := make(chan struct{})
		go func() { streams.Wait(); close(done) }()
		tk := time.NewTicker(250 * time.Millisecond)
	sampling:
		for {
			select {
			case <-done:
				break sampling
			case <-tk.C:
			}
			s := px.sample(t)
			ph.peak.RSS, ph.peak.HeapInuse = max(ph.peak.RSS, s.RSS), max(ph.peak.HeapInuse, s.HeapInuse)
			ph.peak.Goroutines, ph.peak.Threads, ph.peak.FDs = max(ph.peak.Goroutines, s.Goroutines), max(ph.peak.Threads, s.Threads), max(ph.peak.FDs, s.FDs)
			ph.peakStreams = max(ph.peakStreams, s.Metrics.get("proxy_inflight_streams"))
		}
		tk.Stop()
		ph.took = time.Since(start)
		ph.peak.CPU = px.sample(t).CPU
		for i, a := range answers {
			want := events + 3 // content events, the finish chunk, usage, [DONE]
			if a.status == 200 && a.err == nil && a.events == want && bytes.HasSuffix(a.body, []byte("data: [DONE]\n\n")) {
				ph.complete++
			} else if i-ph.complete < 5 {
				t.Logf("%s: incomplete stream: status %d %s, %d events, err %v", ph.name, a.status, a.code, a.events, a.err)
			}
			ph.gaps = append(ph.gaps, a.maxGap)
			ph.ttfe = append(ph.ttfe, a.firstEventAfter)
		}
		t.Logf("%s: %d streams in %s, peak %s, %.0f streams in flight at peak", ph.name, n, ph.took.Round(time.Millisecond), ph.peak, ph.peakStreams)
		settle(settleTime, c)
		ph.after = px.sample(t)
		t.Logf("%s: after, idle: %s", ph.name, ph.after)
		ph.late = px.afterGCs(t, ph.after, 2)
		t.Logf("%s: after two GCs (%s later): %s", ph.name, ph.late.At.Sub(ph.after.At).Round(time.Second), ph.late)
	}

	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	p := func(format string, args ...any) { fmt.Fprintf(tw, format+"\n", args...) }
	p("CONCURRENT STREAMS\t%d streams x %d events, %s apart", n, events, interval)
	for _, ph := range phases {
		per := func(peak, before int64) string {
			return fmt.Sprintf("%.1f KiB", float64(peak-before)/float64(n)/1024)
		}
		p("%s\tbefore / peak / after (idle +%s) / after two GCs (+%s)", ph.name, settleTime, ph.late.At.Sub(ph.after.At).Round(time.Second))
		p("  RSS\t%s / %s / %s / %s\tper stream %s", mib(ph.before.RSS), mib(ph.peak.RSS), mib(ph.after.RSS), mib(ph.late.RSS), per(ph.peak.RSS, ph.before.RSS))
		p("  heap in use\t%s / %s / %s / %s\tper stream %s", mib(ph.before.HeapInuse), mib(ph.peak.HeapInuse), mib(ph.after.HeapInuse), mib(ph.late.HeapInuse), per(ph.peak.HeapInuse, ph.before.HeapInuse))
		p("  goroutines\t%d / %d / %d / %d\tper stream %.2f", ph.before.Goroutines, ph.peak.Goroutines, ph.after.Goroutines, ph.late.Goroutines, float64(ph.peak.Goroutines-ph.before.Goroutines)/float64(n))
		p("  threads\t%d / %d / %d / %d", ph.before.Threads, ph.peak.Threads, ph.after.Threads, ph.late.Threads)
		p("  open fds\t%d / %d / %d / %d", ph.before.FDs, ph.peak.FDs, ph.after.FDs, ph.late.FDs)
		p("  streams\t%d complete of %d in %s; %.0f in flight at peak; CPU %.1f s", ph.complete, n, ph.took.Round(time.Millisecond), ph.peakStreams, ph.peak.CPU-ph.before.CPU)
		p("  time to first event\t%s", percentiles(ph.ttfe))
		p("  largest gap between events, per stream\t%s", percentiles(ph.gaps))
	}
	_ = tw.Flush()
	t.Log("\n" + b.String())

	for _, ph := range phases {
		if ph.complete != n {
			t.Errorf("%s: %d of %d streams arrived whole", ph.name, ph.complete, n)
		}
		for _, g := range ph.gaps {
			if g > 2*time.Second {
				t.Errorf("%s: a stream stalled %s between events", ph.name, g)
				break
			}
		}
		if ph.peakStreams < float64(n)*0.9 {
			t.Errorf("%s: only %.0f streams in flight at once, want about %d: the measurement is not of %d concurrent streams", ph.name, ph.peakStreams, n, n)
		}
		if d := ph.peak.Goroutines - ph.before.Goroutines; d > 3*n {
			t.Errorf("%s: %d more goroutines at peak for %d streams (more than 3 each)", ph.name, d, n)
		}
		if per := (ph.peak.RSS - ph.before.RSS) / int64(n); per > 256<<10 {
			t.Errorf("%s: %d KiB RSS per stream (more than 256 KiB)", ph.name, per>>10)
		}
		if ph.after.Goroutines > ph.before.Goroutines+20 {
			t.Errorf("%s: %d goroutines idle after the streams, %d before", ph.name, ph.after.Goroutines, ph.before.Goroutines)
		}
		if ph.late.HeapInuse > ph.before.HeapInuse+16<<20 {
			t.Errorf("%s: heap in use %s after the streams and a GC, %s before", ph.name, mib(ph.late.HeapInuse), mib(ph.before.HeapInuse))
		}
	}
	if code, _ := px.stop(t); code != 0 {
		t.Errorf("proxy exited with %d after SIGTERM", code)
	}
}
