package models

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// errStoreClosed answers calls made after Close.
var errStoreClosed = errors.New("models: store closed")

// batcher runs many callers' statements as one (group commit): each of its
// workers takes the first call waiting, then every call queued behind it,
// and runs them all in one statement, one round trip and one commit.
// Nothing waits for a batch to fill: under light load each call runs alone
// at once, and batches form only from calls that queue while a statement
// runs, so their size follows the load. A batch of one is the same
// statement; there is one way to run each kind of call.
//
// The workers take turns: a worker holding a call while another's
// statement runs waits for it to end (up to patience), so the calls that
// queue meanwhile join its batch, as they would with one worker. One
// statement at a time makes the largest batches, the fewest round trips
// and the least CPU per call. Past patience the batch runs beside the
// other, so a statement kept waiting (on a row lock, say) does not hold up
// every call.
type batcher[In, Out any] struct {
	calls     chan *batchCall[In, Out]
	done      chan struct{}
	closeOnce sync.Once
	run       func(ctx context.Context, ins []In) ([]Out, error)
	max       int           // calls per batch
	size      func(In) int  // bytes a call adds; nil: calls are not weighed
	maxSize   int           // a batch takes no more calls once its size reaches this
	timeout   time.Duration // bounds one statement
	patience  time.Duration // how long a batch waits for another's statement to end
	turn      chan struct{} // holds a token while a worker's statement runs in its turn

	statements, answered atomic.Uint64 // statements run, calls answered by them
}

// BatchCounts are a batcher's statements run and the calls they answered:
// their ratio is the average batch.
type BatchCounts struct{ Statements, Calls uint64 }

func (b *batcher[In, Out]) counts() BatchCounts {
	return BatchCounts{Statements: b.statements.Load(), Calls: b.answered.Load()}
}

type batchCall[In, Out any] struct {
	ctx   context.Context // the caller's: a call whose caller has gone is not run
	in    In
	out   Out
	err   error
	ready chan struct{}
}

// start makes the queue and starts workers that run batches of at most
// max calls with run, which returns one result per input, in order. The
// fields are set before it and never after.
func (b *batcher[In, Out]) start(workers int) *batcher[In, Out] {
	b.calls = make(chan *batchCall[In, Out], b.max) // a batch's worth may queue
	b.done = make(chan struct{})
	b.turn = make(chan struct{}, 1)
	for range workers {
		go b.work()
	}
	return b
}

// do runs the call in the next batch and returns its result. When ctx
// ends (or the store closes) first, the call returns at once: if its batch
// has not started it is left out, otherwise its statement may still
// commit, exactly as a cancelled statement of its own may.
func (b *batcher[In, Out]) do(ctx context.Context, in In) (Out, error) {
	c := &batchCall[In, Out]{ctx: ctx, in: in, ready: make(chan struct{})}
	var zero Out
	select {
	case b.calls <- c:
	case <-ctx.Done():
		return zero, ctx.Err()
	case <-b.done:
		return zero, errStoreClosed
	}
	select {
	case <-c.ready:
		return c.out, c.err
	case <-ctx.Done():
		return zero, ctx.Err()
	case <-b.done:
		return zero, errStoreClosed
	}
}

// close stops the workers once their batches are done; later calls fail.
func (b *batcher[In, Out]) close() { b.closeOnce.Do(func() { close(b.done) }) }

func (b *batcher[In, Out]) work() {
	batch := make([]*batchCall[In, Out], 0, b.max)
	for {
		select {
		case c := <-b.calls:
			batch = append(batch[:0], c)
		case <-b.done:
			return
		}
		inTurn := b.takeTurn()
		size := b.sizeOf(batch[0])
	fill:
		for len(batch) < b.max && (b.size == nil || size < b.maxSize) {
			select {
			case c := <-b.calls:
				batch = append(batch, c)
				size += b.sizeOf(c)
			default:
				break fill
			}
		}
		b.runBatch(batch)
		if inTurn {
			<-b.turn
		}
		clear(batch) // hold no caller's values until the next batch
	}
}

// takeTurn waits until no other worker's statement runs in its turn, or
// patience has passed, and reports whether this worker took the turn (to
// hand back when its statement is done).
func (b *batcher[In, Out]) takeTurn() bool {
	select {
	case b.turn <- struct{}{}:
		return true
	default:
	}
	t := time.NewTimer(b.patience)
	defer t.Stop()
	select {
	case b.turn <- struct{}{}:
		return true
	case <-t.C:
		return false
	case <-b.done:
		return false
	}
}

func (b *batcher[In, Out]) sizeOf(c *batchCall[In, Out]) int {
	if b.size == nil {
		return 0
	}
	return b.size(c.in)
}

// runBatch runs one statement for the batch and answers each call. When
// the database refuses the statement (one row it cannot take, say), nothing
// of it was written, and each call is run alone, so that the row fails
// only its own call; a connection error or a timeout fails them all at
// once, as trying each again would only wait longer.
func (b *batcher[In, Out]) runBatch(batch []*batchCall[In, Out]) {
	live, ins := make([]*batchCall[In, Out], 0, len(batch)), make([]In, 0, len(batch))
	for _, c := range batch {
		if err := c.ctx.Err(); err != nil {
			c.err = err
			close(c.ready)
			continue
		}
		live, ins = append(live, c), append(ins, c.in)
	}
	if batch = live; len(batch) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), b.timeout)
	outs, err := b.run(ctx, ins)
	cancel()
	b.statements.Add(1)
	var refused *pgconn.PgError
	if err != nil && len(batch) > 1 && errors.As(err, &refused) {
		for _, c := range batch {
			b.runBatch([]*batchCall[In, Out]{c})
		}
		return
	}
	if err == nil && len(outs) != len(batch) {
		err = errors.New("models: batch answered the wrong number of rows")
	}
	b.answered.Add(uint64(len(batch)))
	for i, c := range batch {
		if err != nil {
			c.err = err
		} else {
			c.out = outs[i]
		}
		close(c.ready)
	}
}
