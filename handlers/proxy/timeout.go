package proxy

import (
	"context"
	"sync"
	"time"
)

// sharedTimeout hands out contexts that end between d - d/64 and d after
// they are asked for: the calls of one d/64 share a context, and with it
// its timer. A keyed request bounds its claim and its completion this way;
// a context and a timer for every call cost about 3% of a keyed request's
// CPU (issue 15). Nothing ends them early: each ends at its deadline, when
// its timer lets it go.
type sharedTimeout struct {
	d time.Duration

	mu     sync.Mutex
	ctx    context.Context
	cancel context.CancelFunc // never called: ctx ends at its deadline
	renew  time.Time          // when the next call gets a new context
}

func (s *sharedTimeout) context() context.Context {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctx == nil || !now.Before(s.renew) {
		s.ctx, s.cancel = context.WithDeadline(context.Background(), now.Add(s.d))
		s.renew = now.Add(s.d / 64)
	}
	return s.ctx
}
