package models

import (
	"context"
	"time"
)

// What the external tests reach of the batcher and the claims' batch.

type IntBatcher = batcher[int, int]

var ErrStoreClosed = errStoreClosed

func NewIntBatcher(workers int, patience time.Duration, size func(int) int, maxSize int, run func(context.Context, []int) ([]int, error)) *IntBatcher {
	return (&batcher[int, int]{max: 64, timeout: 5 * time.Second, patience: patience, size: size, maxSize: maxSize, run: run}).start(workers)
}

func (b *batcher[In, Out]) Do(ctx context.Context, in In) (Out, error) { return b.do(ctx, in) }
func (b *batcher[In, Out]) Queued() int                                { return len(b.calls) }
func (b *batcher[In, Out]) Close()                                     { b.close() }

// RunBatch runs ins as one batch, as a worker would after they queued
// together, and returns each call's result. A call of ctxs[i] (if given)
// has that caller's context.
func (b *batcher[In, Out]) RunBatch(ins []In, ctxs ...context.Context) ([]Out, []error) {
	calls := make([]*batchCall[In, Out], len(ins))
	for i, in := range ins {
		ctx := context.Background()
		if i < len(ctxs) && ctxs[i] != nil {
			ctx = ctxs[i]
		}
		calls[i] = &batchCall[In, Out]{ctx: ctx, in: in, ready: make(chan struct{})}
	}
	b.runBatch(calls)
	outs, errs := make([]Out, len(ins)), make([]error, len(ins))
	for i, c := range calls {
		<-c.ready
		outs[i], errs[i] = c.out, c.err
	}
	return outs, errs
}

// ClaimBatch runs rs as one batch of claims.
func (s *Store) ClaimBatch(rs []ClaimRequest) ([]bool, []error) { return s.claims.RunBatch(rs) }
