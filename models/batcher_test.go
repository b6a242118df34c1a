package models_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/openai-idempotent-proxy/proxy/app/apptest"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// fakeStatement doubles each input; it refuses (as PostgreSQL would) any
// batch holding a negative one, and records every batch it ran.
type fakeStatement struct {
	mu      sync.Mutex
	batches [][]int
	gate    chan struct{} // if set, the first batch waits for it
	started chan struct{}
}

func newGatedStatement() *fakeStatement {
	return &fakeStatement{gate: make(chan struct{}), started: make(chan struct{})}
}

func (f *fakeStatement) run(_ context.Context, ins []int) ([]int, error) {
	f.mu.Lock()
	first := len(f.batches) == 0
	f.batches = append(f.batches, slices.Clone(ins))
	f.mu.Unlock()
	if first && f.gate != nil {
		close(f.started)
		<-f.gate
	}
	out := make([]int, len(ins))
	for i, in := range ins {
		if in < 0 {
			return nil, &pgconn.PgError{Code: "22021", Message: "invalid byte sequence"}
		}
		out[i] = 2 * in
	}
	return out, nil
}

func (f *fakeStatement) ran() [][]int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.batches)
}

// callAll calls b.Do for each input, in order: the first, once the worker
// runs it, holds the worker (its statement waits for f's gate), and each
// further input is queued before the next is sent. Then the gate opens.
func callAll(t *testing.T, b *models.IntBatcher, f *fakeStatement, ins ...int) []int {
	t.Helper()
	results := make([]int, len(ins))
	var wg sync.WaitGroup
	for i, in := range ins {
		wg.Go(func() {
			out, err := b.Do(context.Background(), in)
			if err != nil {
				t.Errorf("call %d: %v", in, err)
			}
			results[i] = out
		})
		if i == 0 {
			<-f.started
			continue
		}
		apptest.Eventually(t, 5*time.Second, func() bool { return b.Queued() == i }, "%d calls queued", i)
	}
	close(f.gate)
	wg.Wait()
	return results
}

func TestBatcherJoinsTheCallsQueuedWhileItsWorkerIsBusy(t *testing.T) {
	f := newGatedStatement()
	b := models.NewIntBatcher(1, 0, nil, 0, f.run)
	defer b.Close()
	results := callAll(t, b, f, 0, 1, 2, 3, 4, 5)
	if got := f.ran(); len(got) != 2 || !slices.Equal(got[1], []int{1, 2, 3, 4, 5}) {
		t.Fatalf("batches %v, want call 0 alone, then the five queued behind it in one", got)
	}
	for i, out := range results {
		if out != 2*i {
			t.Errorf("call %d got %d, want its own result %d", i, out, 2*i)
		}
	}
}

// TestBatcherWorkersTakeTurns: with two workers, a call taken while the
// other's statement runs waits for it, and the calls that queue meanwhile
// join its batch: the batches of one worker, not one per call.
func TestBatcherWorkersTakeTurns(t *testing.T) {
	f := newGatedStatement()
	b := models.NewIntBatcher(2, time.Minute, nil, 0, f.run)
	defer b.Close()
	var wg sync.WaitGroup
	call := func(in int) {
		wg.Go(func() {
			if out, err := b.Do(context.Background(), in); err != nil || out != 2*in {
				t.Errorf("call %d: %d, %v", in, out, err)
			}
		})
	}
	call(0)
	<-f.started
	for in := 1; in <= 5; in++ {
		call(in)
	}
	// One call is in the second worker's hand, the others queue behind it.
	apptest.Eventually(t, 5*time.Second, func() bool { return b.Queued() == 4 }, "four calls queued behind the waiting worker")
	close(f.gate)
	wg.Wait()
	// The waiting worker's batch takes the queue; the first worker, its turn
	// over, may have taken one call of it first and run it next.
	got := f.ran()
	if len(got) < 2 || len(got) > 3 || len(got[1]) < 4 || len(slices.Concat(got...)) != 6 {
		t.Fatalf("batches %v, want call 0 alone, then the five that came while it ran in one or two", got)
	}
}

// TestBatcherRunsBesideAStatementKeptWaiting: past its patience, the
// second worker runs its batch while the first's statement still waits.
func TestBatcherRunsBesideAStatementKeptWaiting(t *testing.T) {
	f := newGatedStatement()
	b := models.NewIntBatcher(2, 10*time.Millisecond, nil, 0, f.run)
	defer b.Close()
	first := make(chan error, 1)
	go func() {
		_, err := b.Do(context.Background(), 0)
		first <- err
	}()
	<-f.started
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if out, err := b.Do(ctx, 1); err != nil || out != 2 {
		t.Fatalf("call beside a waiting statement: %d, %v", out, err)
	}
	close(f.gate)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if got := f.ran(); len(got) != 2 || !slices.Equal(got[1], []int{1}) {
		t.Fatalf("batches %v, want call 0, then call 1 beside it", got)
	}
}

func TestBatcherStopsTakingCallsAtItsSize(t *testing.T) {
	f := newGatedStatement()
	b := models.NewIntBatcher(1, 0, func(in int) int { return in }, 10, f.run)
	defer b.Close()
	callAll(t, b, f, 1, 6, 5, 4)
	// 6 + 5 reach the size of 10: that batch takes no more, and 4 waits.
	if got := f.ran(); len(got) != 3 || !slices.Equal(got[1], []int{6, 5}) || !slices.Equal(got[2], []int{4}) {
		t.Fatalf("batches %v, want [1] [6 5] [4]", got)
	}
}

func TestBatcherRunsARefusedBatchCallByCall(t *testing.T) {
	f := &fakeStatement{}
	b := models.NewIntBatcher(0, 0, nil, 0, f.run) // no worker: RunBatch alone
	outs, errs := b.RunBatch([]int{3, -1, 4})
	if got := f.ran(); len(got) != 4 {
		t.Fatalf("statements %v, want the batch, then each call alone", got)
	}
	if outs[0] != 6 || errs[0] != nil || outs[2] != 8 || errs[2] != nil {
		t.Errorf("the good calls got %d, %v and %d, %v; want 6 and 8", outs[0], errs[0], outs[2], errs[2])
	}
	var refused *pgconn.PgError
	if !errors.As(errs[1], &refused) {
		t.Errorf("the refused call got %v, want its PostgreSQL error", errs[1])
	}
}

func TestBatcherLeavesOutCallsWhoseCallerHasGone(t *testing.T) {
	f := &fakeStatement{}
	b := models.NewIntBatcher(0, 0, nil, 0, f.run)
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	outs, errs := b.RunBatch([]int{1, 2, 3}, nil, gone, nil)
	if got := f.ran(); len(got) != 1 || !slices.Equal(got[0], []int{1, 3}) {
		t.Fatalf("statements %v, want one for calls 1 and 3 only", got)
	}
	if !errors.Is(errs[1], context.Canceled) || outs[0] != 2 || outs[2] != 6 {
		t.Errorf("results %v, errors %v; want 2 and 6, and the gone caller's context error", outs, errs)
	}
}

func TestBatcherFailsAllAtOnceWhenTheDatabaseIsAway(t *testing.T) {
	var statements int
	down := errors.New("dial tcp: connection refused")
	b := models.NewIntBatcher(0, 0, nil, 0, func(context.Context, []int) ([]int, error) {
		statements++
		return nil, down
	})
	_, errs := b.RunBatch([]int{1, 2, 3})
	if statements != 1 {
		t.Errorf("%d statements, want 1: trying each again would only wait longer", statements)
	}
	for i, err := range errs {
		if !errors.Is(err, down) {
			t.Errorf("call %d got %v, want the connection error", i, err)
		}
	}
}

func TestBatcherRefusesCallsOnceClosed(t *testing.T) {
	b := models.NewIntBatcher(2, 0, nil, 0, (&fakeStatement{}).run)
	b.Close()
	b.Close() // closing the store twice is harmless
	if _, err := b.Do(context.Background(), 1); !errors.Is(err, models.ErrStoreClosed) {
		t.Fatalf("after close: %v, want ErrStoreClosed", err)
	}
}
