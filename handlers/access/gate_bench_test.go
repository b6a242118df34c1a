package access_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/handlers/access"
	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// Run: go test -run '^$' -bench . ./handlers/access/
//
// The checks an unkeyed request goes through before it is forwarded:
// Authenticate, Permits and Admit, against 1,000 managed keys plus two
// PROXY_API_KEYS. EnvOnly is what main did before (the constant-time
// check of PROXY_API_KEYS alone); the difference is what managed keys add.
// Limited keys take their limits from what the replica holds, and the
// database only once per batch (allowance.go): BenchmarkAdmitLimited, on
// each database, with the p50 of one admission.

const envKey = "pk-client-alpha-0123456789"

func benchGate(b *testing.B, store access.Store) (*access.Gate, []string) {
	env := handlers.NewAuthenticator([]handlers.ClientKey{{Name: "alpha", Key: envKey}, {Name: "beta", Key: "pk-client-beta-9876543210"}})
	var keys []string
	if s, ok := store.(*models.Store); ok {
		for i := range 1000 {
			_, k, err := s.CreateClientKey(context.Background(), fmt.Sprintf("k%d", i), models.ClientKeyLimits{Models: []string{"gpt-4o-mini"}})
			if err != nil {
				b.Fatal(err)
			}
			keys = append(keys, k)
		}
	}
	return access.New(context.Background(), access.Options{Store: store, Env: env.AuthenticateDigest}), keys
}

func check(b *testing.B, g *access.Gate, auth []byte) {
	c, err := g.Authenticate(auth)
	if err != nil {
		b.Fatal(err)
	}
	if err := c.Permits("gpt-4o-mini"); err != nil {
		b.Fatal(err)
	}
	if _, err := g.Admit(context.Background(), c, access.Request{Model: "gpt-4o-mini", BodyBytes: 100}); err != nil {
		b.Fatal(err)
	}
}

func BenchmarkEnvOnly(b *testing.B) {
	env := handlers.NewAuthenticator([]handlers.ClientKey{{Name: "alpha", Key: envKey}, {Name: "beta", Key: "pk-client-beta-9876543210"}})
	auth := []byte("Bearer " + envKey)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := env.Authenticate(auth); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkGateEnvKey(b *testing.B) {
	g, _ := benchGate(b, testdb.SQLite(b, nil))
	auth := []byte("Bearer " + envKey)
	b.ReportAllocs()
	for b.Loop() {
		check(b, g, auth)
	}
}

func BenchmarkGateManagedKey(b *testing.B) {
	g, keys := benchGate(b, testdb.SQLite(b, nil))
	auth := []byte("Bearer " + keys[500])
	b.ReportAllocs()
	for b.Loop() {
		check(b, g, auth)
	}
}

func BenchmarkAdmitLimited(b *testing.B) {
	for _, db := range []string{"sqlite", "postgres"} {
		for name, limits := range map[string]models.ClientKeyLimits{
			"rpm":    {RPM: 1_000_000_000},
			"budget": {BudgetMicros: 1_000_000_000_000, BudgetPeriod: models.PeriodMonth},
		} {
			b.Run(db+"/"+name, func(b *testing.B) {
				var s *models.Store
				if db == "sqlite" {
					s = testdb.SQLite(b, nil)
				} else {
					s = testdb.Postgres(b, nil)
				}
				_, key, err := s.CreateClientKey(context.Background(), "limited", limits)
				if err != nil {
					b.Fatal(err)
				}
				g := access.New(context.Background(), access.Options{Store: s, Env: func([32]byte) (string, error) { return "", access.ErrUnknownKey }})
				defer g.Close()
				auth := []byte("Bearer " + key)
				lat := make([]time.Duration, 0, b.N)
				for b.Loop() {
					start := time.Now()
					c, err := g.Authenticate(auth)
					if err != nil {
						b.Fatal(err)
					}
					t, err := g.Admit(context.Background(), c, access.Request{Model: "gpt-4o-mini", BodyBytes: 100})
					if err != nil {
						b.Fatal(err)
					}
					t.Settle(10, 20)
					lat = append(lat, time.Since(start))
				}
				if len(lat) > 0 {
					b.ReportMetric(float64(median(lat).Nanoseconds())/1000, "p50-µs")
				}
			})
		}
	}
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
	return s[len(s)/2]
}
