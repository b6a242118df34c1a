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
		a.Gate.Run(ctx) // keeps every replica's key table within a second of the database
	}()
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

// sweep deletes in bounded batches, so a large backlog never holds long
// locks. Each statement runs to its end even when Close stops the jobs
// (stop is checked between them): a cancelled statement would only log a
// "context canceled" failure for every step on the way out.
func (a *App) sweep(stop context.Context) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(stop), 30*time.Second)
	defer cancel()
	steps := []struct {
		what  string
		quiet bool // no line for what it deleted
		run   func() (int64, error)
	}{
		{"expired idempotency keys", false, func() (int64, error) { return a.Store.SweepIdempotency(ctx, 1000) }},
		{"abandoned running responses", true, func() (int64, error) { return a.Store.SweepLive(ctx) }},
		{"old request log rows", false, func() (int64, error) {
			return a.Store.SweepRequestLogs(ctx, a.Store.Now().Add(-a.cfg.LogRetention), 5000)
		}},
		{"old request roll-ups", true, func() (int64, error) {
			return a.Store.SweepRollups(ctx, a.Store.Now().Add(-a.cfg.LogRetention), 5000)
		}},
		{"expired sessions", true, func() (int64, error) { return a.Store.SweepKV(ctx, 1000) }},
	}
	for _, s := range steps {
		if stop.Err() != nil {
			return
		}
		n, err := s.run()
		switch {
		case err != nil:
			a.logger.Warn("sweep "+s.what, "error", err.Error())
		case n > 0 && !s.quiet:
			a.logger.Info("swept "+s.what, "deleted", n)
		}
	}
}
