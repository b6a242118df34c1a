package models_test

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

var kvEpoch = time.Date(2025, 4, 1, 8, 0, 0, 0, time.UTC)

func TestKVStorage(t *testing.T) {
	for _, db := range []string{"sqlite", "postgres"} {
		t.Run(db, func(t *testing.T) {
			clock := testdb.NewClock(kvEpoch)
			var s *models.Store
			if db == "sqlite" {
				s = testdb.SQLite(t, clock.Now)
			} else {
				s = testdb.Postgres(t, clock.Now)
			}
			kv := s.NewKVStorage("session:")
			other := s.NewKVStorage("csrf:")

			if v, err := kv.Get("missing"); v != nil || err != nil {
				t.Fatalf("Get(missing) = %q, %v; want nil, nil", v, err)
			}
			kvMust(t, kv.Set("a", []byte("one"), 0))
			kvMust(t, kv.Set("a", []byte("two"), 0)) // upsert
			kvMust(t, kv.Set("b", []byte{0, 1, 2, 255}, time.Minute))
			kvMust(t, other.Set("a", []byte("csrf"), 0))
			wantKV(t, kv, "a", "two")
			wantKV(t, kv, "b", "\x00\x01\x02\xff")
			wantKV(t, other, "a", "csrf") // prefixes keep users apart

			// Empty keys and values are ignored, as Fiber's storages do.
			kvMust(t, kv.Set("", []byte("x"), 0))
			kvMust(t, kv.Set("empty", nil, 0))
			wantKV(t, kv, "empty", "")

			clock.Advance(59 * time.Second)
			wantKV(t, kv, "b", "\x00\x01\x02\xff")
			clock.Advance(time.Second)
			wantKV(t, kv, "b", "") // expired: invisible at once
			kvMust(t, kv.Set("b", []byte("again"), time.Minute))
			wantKV(t, kv, "b", "again") // an expired row is overwritten, not duplicated

			kvMust(t, kv.Delete("a"))
			kvMust(t, kv.Delete("never-there"))
			wantKV(t, kv, "a", "")
			wantKV(t, other, "a", "csrf")

			kvMust(t, kv.Set("c", []byte("c"), 0))
			kvMust(t, kv.Reset())
			wantKV(t, kv, "c", "")
			wantKV(t, other, "a", "csrf") // Reset clears its own prefix only
			kvMust(t, kv.Close())
			wantKV(t, other, "a", "csrf") // Close leaves the shared pool open
		})
	}
}

func TestSweepKV(t *testing.T) {
	for _, db := range []string{"sqlite", "postgres"} {
		t.Run(db, func(t *testing.T) {
			clock := testdb.NewClock(kvEpoch)
			var s *models.Store
			if db == "sqlite" {
				s = testdb.SQLite(t, clock.Now)
			} else {
				s = testdb.Postgres(t, clock.Now)
			}
			kv := s.NewKVStorage("login:")
			for i := range 25 {
				kvMust(t, kv.Set(fmt.Sprint("short-", i), []byte("x"), time.Minute))
			}
			kvMust(t, kv.Set("forever", []byte("x"), 0))
			kvMust(t, kv.Set("long", []byte("x"), time.Hour))
			clock.Advance(2 * time.Minute)
			n, err := s.SweepKV(context.Background(), 10)
			kvMust(t, err)
			if n != 25 {
				t.Fatalf("swept %d, want 25", n)
			}
			var left int64
			kvMust(t, s.DB().Raw("SELECT COUNT(*) FROM kv_store").Scan(&left).Error)
			if left != 2 {
				t.Fatalf("%d rows left, want 2", left)
			}

			// Set sweeps by itself about once a minute.
			for i := range 5 {
				kvMust(t, kv.Set(fmt.Sprint("later-", i), []byte("x"), time.Second))
			}
			clock.Advance(2 * time.Minute)
			kvMust(t, kv.Set("trigger", []byte("x"), 0))
			kvMust(t, s.DB().Raw("SELECT COUNT(*) FROM kv_store").Scan(&left).Error)
			if left != 3 {
				t.Fatalf("%d rows left after an opportunistic sweep, want 3", left)
			}
		})
	}
}

// Two replicas (two stores on one PostgreSQL) share every entry, and
// concurrent writers of one key never fail.
func TestKVStorageSharedByReplicas(t *testing.T) {
	url := testdb.PostgresURL(t)
	open := func() *models.Store {
		s, err := models.Open(context.Background(), models.Options{DatabaseURL: url})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	}
	a, b := open().NewKVStorage("session:"), open().NewKVStorage("session:")
	kvMust(t, a.Set("sid", []byte("signed-in"), time.Hour))
	wantKV(t, b, "sid", "signed-in")
	kvMust(t, b.Delete("sid"))
	wantKV(t, a, "sid", "")

	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			kv := a
			if i%2 == 1 {
				kv = b
			}
			errs <- kv.Set("hot", []byte(fmt.Sprint(i)), time.Minute)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		kvMust(t, err)
	}
	if v, err := a.Get("hot"); err != nil || len(v) == 0 {
		t.Fatalf("Get(hot) = %q, %v", v, err)
	}
}

func wantKV(t *testing.T, kv *models.KVStorage, key, want string) {
	t.Helper()
	got, err := kv.Get(key)
	if err != nil {
		t.Fatalf("Get(%q): %v", key, err)
	}
	if want == "" && got != nil {
		t.Fatalf("Get(%q) = %q, want nil", key, got)
	}
	if !bytes.Equal(got, []byte(want)) && want != "" {
		t.Fatalf("Get(%q) = %q, want %q", key, got, want)
	}
}

func kvMust(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
