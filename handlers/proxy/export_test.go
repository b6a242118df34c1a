package proxy

import (
	"context"
	"time"
)

// SharedTimeout is a sharedTimeout of d's contexts, for the tests.
func SharedTimeout(d time.Duration) func() context.Context { return (&sharedTimeout{d: d}).context }
