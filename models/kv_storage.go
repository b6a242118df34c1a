package models

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"gorm.io/gorm"
)

// KVStorage implements fiber.Storage (Get, Set, Delete, Reset, Close) on
// the kv_store table, so the dashboard's sessions, CSRF tokens and login
// throttle live in the database every replica shares instead of in one
// process's memory. Each user gets its own key prefix; Reset clears only
// that prefix.
//
// fiber.Storage has no context parameter, so every call runs under its own
// short deadline. Expired entries are invisible to Get at once and deleted
// by SweepKV, which Set also runs opportunistically about once a minute.
type KVStorage struct {
	store   *Store
	prefix  string
	timeout time.Duration
	// lastSweep is the unix second of the last opportunistic sweep.
	lastSweep atomic.Int64
}

// kvEntry is one row of kv_store.
type kvEntry struct {
	K         string `gorm:"column:k;primaryKey"`
	V         []byte `gorm:"column:v"`
	ExpiresAt *time.Time
}

func (kvEntry) TableName() string { return "kv_store" }

// kvSweepEvery is how often Set sweeps expired entries; kvSweepBatch bounds
// one sweep statement.
const (
	kvSweepEvery = time.Minute
	kvSweepBatch = 500
)

// NewKVStorage returns a storage whose keys are stored as prefix+key.
func (s *Store) NewKVStorage(prefix string) *KVStorage {
	k := &KVStorage{store: s, prefix: prefix, timeout: 5 * time.Second}
	k.lastSweep.Store(s.now().Unix())
	return k
}

func (k *KVStorage) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), k.timeout)
}

// Get returns the value stored under key, or nil (and no error) when there
// is none or it has expired.
func (k *KVStorage) Get(key string) ([]byte, error) {
	if key == "" {
		return nil, nil
	}
	ctx, cancel := k.ctx()
	defer cancel()
	var e kvEntry
	err := k.store.db.WithContext(ctx).
		Where("k = ? AND (expires_at IS NULL OR expires_at > ?)", k.prefix+key, k.store.now()).
		Take(&e).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("models: kv get: %w", err)
	}
	return e.V, nil
}

// Set stores val under key; exp > 0 makes it expire after exp, 0 never.
// Like Fiber's own storages it ignores an empty key or value.
func (k *KVStorage) Set(key string, val []byte, exp time.Duration) error {
	if key == "" || len(val) == 0 {
		return nil
	}
	now := k.store.now()
	var expires *time.Time
	if exp > 0 {
		t := now.Add(exp)
		expires = &t
	}
	ctx, cancel := k.ctx()
	defer cancel()
	// One upsert: the same statement on PostgreSQL and SQLite, and never a
	// read-then-write race between replicas.
	err := k.store.db.WithContext(ctx).Exec(
		"INSERT INTO kv_store (k, v, expires_at) VALUES (?, ?, ?)"+
			" ON CONFLICT (k) DO UPDATE SET v = excluded.v, expires_at = excluded.expires_at",
		k.prefix+key, val, expires).Error
	if err != nil {
		return fmt.Errorf("models: kv set: %w", err)
	}
	if last := k.lastSweep.Load(); now.Unix()-last >= int64(kvSweepEvery/time.Second) && k.lastSweep.CompareAndSwap(last, now.Unix()) {
		// One bounded batch: a backlog drains over the following minutes
		// without ever making one Set slow. A failure is harmless: the
		// value is stored, Get ignores expired rows, and the next sweep
		// tries again.
		_, _ = k.store.sweepKVOnce(ctx, kvSweepBatch)
	}
	return nil
}

// Delete removes key; deleting a missing key is not an error.
func (k *KVStorage) Delete(key string) error {
	if key == "" {
		return nil
	}
	ctx, cancel := k.ctx()
	defer cancel()
	if err := k.store.db.WithContext(ctx).Exec("DELETE FROM kv_store WHERE k = ?", k.prefix+key).Error; err != nil {
		return fmt.Errorf("models: kv delete: %w", err)
	}
	return nil
}

// Reset deletes every key under this storage's prefix (all of kv_store
// when the prefix is empty).
func (k *KVStorage) Reset() error {
	ctx, cancel := k.ctx()
	defer cancel()
	err := k.store.db.WithContext(ctx).Exec(`DELETE FROM kv_store WHERE k LIKE ? ESCAPE '\'`, likeEscape(k.prefix)+"%").Error
	if err != nil {
		return fmt.Errorf("models: kv reset: %w", err)
	}
	return nil
}

// Close does nothing: the Store owns the connection pool and closes it.
func (k *KVStorage) Close() error { return nil }

// SweepKV deletes expired kv_store entries, batch rows per statement, until
// none are left, and the dashboard's ended login-failure windows, and
// returns how many it deleted.
func (s *Store) SweepKV(ctx context.Context, batch int) (int64, error) {
	total, err := s.sweepLoginFailures(ctx)
	if err != nil {
		return total, err
	}
	if batch <= 0 {
		batch = kvSweepBatch
	}
	n, err := inBatches(batch, func(limit int) (int64, error) { return s.sweepKVOnce(ctx, limit) })
	return total + n, err
}

func (s *Store) sweepKVOnce(ctx context.Context, batch int) (int64, error) {
	if batch <= 0 {
		batch = kvSweepBatch
	}
	n, err := s.execSweep(ctx,
		"DELETE FROM kv_store WHERE k IN (SELECT k FROM kv_store WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)",
		s.now(), batch)
	if err != nil {
		return 0, fmt.Errorf("models: sweep kv store: %w", err)
	}
	return n, nil
}
