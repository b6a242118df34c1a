package dashboard

import (
	"context"
	"crypto/rand"
	"sync"
	"time"
)

// memoryAuth keeps Auth in this process, for a dashboard built
// without a database (page tests). The app always passes the Store.
type memoryAuth struct {
	now      func() time.Time
	secret   []byte
	mu       sync.Mutex
	revoked  map[string]time.Time
	failures map[string]memoryFailures
}

type memoryFailures struct {
	n    int64
	ends time.Time
}

func newMemoryAuth(now func() time.Time) *memoryAuth {
	secret := make([]byte, 32)
	_, _ = rand.Read(secret)
	return &memoryAuth{now: now, secret: secret, revoked: map[string]time.Time{}, failures: map[string]memoryFailures{}}
}

func (m *memoryAuth) DashboardSecret(context.Context) ([]byte, error) { return m.secret, nil }

func (m *memoryAuth) RevokeSession(_ context.Context, id string, until time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.revoked[id] = until
	return nil
}

func (m *memoryAuth) SessionRevoked(_ context.Context, id string) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	until, ok := m.revoked[id]
	return ok && m.now().Before(until), nil
}

func (m *memoryAuth) CountLoginFailure(_ context.Context, key string, window time.Duration) (int64, time.Time, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	f := m.failures[key]
	if now := m.now(); !now.Before(f.ends) {
		f = memoryFailures{ends: now.Add(window)}
	}
	f.n++
	m.failures[key] = f
	return f.n, f.ends, nil
}

func (m *memoryAuth) ForgiveLoginFailure(_ context.Context, key string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if f, ok := m.failures[key]; ok && f.n > 0 {
		f.n--
		m.failures[key] = f
	}
	return nil
}
