package models_test

import (
	"context"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// BenchmarkClaimComplete is the keyed path's two statements: each op claims
// a new key and stores its answer, one at a time and from 64 goroutines at
// once (where PostgreSQL's batches form). cpu-ns/op is this process's CPU
// (not the PostgreSQL server's).
//
//	go test ./models -run '^$' -bench ClaimComplete -benchtime 2000x
func BenchmarkClaimComplete(b *testing.B) {
	for _, db := range []struct {
		name string
		open func(testing.TB, func() time.Time) *models.Store
	}{{"sqlite", testdb.SQLite}, {"postgres", testdb.Postgres}} {
		b.Run(db.name, func(b *testing.B) {
			s := db.open(b, time.Now)
			var n atomic.Int64
			b.ReportAllocs()
			cpuStart := processCPU(b)
			for b.Loop() {
				claimComplete(b, s, "bench-"+strconv.FormatInt(n.Add(1), 10))
			}
			b.ReportMetric(float64((processCPU(b)-cpuStart).Nanoseconds())/float64(b.N), "cpu-ns/op")
		})
		b.Run(db.name+"-64", func(b *testing.B) {
			s := db.open(b, time.Now)
			var n atomic.Int64
			b.ReportAllocs()
			b.SetParallelism(64 / runtime.GOMAXPROCS(0))
			cpuStart := processCPU(b)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					claimComplete(b, s, "bench-"+strconv.FormatInt(n.Add(1), 10))
				}
			})
			b.ReportMetric(float64((processCPU(b)-cpuStart).Nanoseconds())/float64(b.N), "cpu-ns/op")
		})
	}
}

// claimComplete claims the key id and stores its answer.
func claimComplete(b testing.TB, s *models.Store, id string) {
	ctx := context.Background()
	body := []byte(`{"id":"chatcmpl-1","object":"chat.completion","choices":[]}`)
	claimed, _, err := s.ClaimIdempotency(ctx, models.ClaimRequest{
		ID: id, Client: "c", Method: "POST", Path: "/v1/chat/completions", Key: id,
		Fingerprint: "f", Owner: "o", Lease: 30 * time.Second, TTL: 24 * time.Hour,
	})
	if err != nil || !claimed {
		b.Errorf("claim: %v, claimed %v", err, claimed)
		return
	}
	err = s.CompleteIdempotency(ctx, id, "o", models.Completion{
		Status: 200, Headers: `{"Content-Type":["application/json"]}`, Body: body,
		BodySize: int64(len(body)), Replayable: true,
	}, 24*time.Hour)
	if err != nil {
		b.Error(err)
	}
}
