package app

import (
	"context"
	"time"
)

// sweepEvery is how often expired idempotency keys and old log rows go.
const sweepEvery = time.Minute

// startJobs runs the sweepers until Close.
func (a *App) startJobs() {
	ctx, cancel := context.WithCancel(context.Background())
	a.stopJobs = cancel
	a.jobs.Add(1)
	go func() {
		defer a.jobs.Done()
		t := time.NewTicker(sweepEvery)
		defer t.Stop()
		for {
			a.sweep(ctx)
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
}

// sweep deletes in bounded batches, so a large backlog never holds long locks.
func (a *App) sweep(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if n, err := a.Store.SweepIdempotency(ctx, 1000); err != nil {
		a.logger.Warn("sweep idempotency keys", "error", err.Error())
	} else if n > 0 {
		a.logger.Info("swept expired idempotency keys", "deleted", n)
	}
	before := a.Store.Now().Add(-a.cfg.LogRetention)
	if n, err := a.Store.SweepRequestLogs(ctx, before, 5000); err != nil {
		a.logger.Warn("sweep request log", "error", err.Error())
	} else if n > 0 {
		a.logger.Info("swept old request log rows", "deleted", n)
	}
	if _, err := a.Store.SweepRollups(ctx, before, 5000); err != nil {
		a.logger.Warn("sweep request roll-ups", "error", err.Error())
	}
	if _, err := a.Store.SweepKV(ctx, 1000); err != nil {
		a.logger.Warn("sweep expired sessions", "error", err.Error())
	}
}
