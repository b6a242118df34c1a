package models_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// BenchmarkClaimComplete is the keyed path's two statements: each op claims
// a new key and stores its answer. cpu-ns/op is this process's CPU (not
// the PostgreSQL server's).
//
//	go test ./models -run '^$' -bench ClaimComplete -benchtime 2000x
func BenchmarkClaimComplete(b *testing.B) {
	for _, db := range []struct {
		name string
		open func(testing.TB, func() time.Time) *models.Store
	}{{"sqlite", testdb.SQLite}, {"postgres", testdb.Postgres}} {
		b.Run(db.name, func(b *testing.B) {
			s := db.open(b, time.Now)
			ctx := context.Background()
			body := []byte(`{"id":"chatcmpl-1","object":"chat.completion","choices":[]}`)
			b.ReportAllocs()
			cpuStart, i := processCPU(b), 0
			for b.Loop() {
				i++
				id := "bench-" + strconv.Itoa(i)
				claimed, _, err := s.ClaimIdempotency(ctx, models.ClaimRequest{
					ID: id, Client: "c", Method: "POST", Path: "/v1/chat/completions", Key: id,
					Fingerprint: "f", Owner: "o", Lease: 30 * time.Second, TTL: 24 * time.Hour,
				})
				if err != nil || !claimed {
					b.Fatalf("claim: %v, claimed %v", err, claimed)
				}
				err = s.CompleteIdempotency(ctx, id, "o", models.Completion{
					Status: 200, Headers: `{"Content-Type":["application/json"]}`, Body: body,
					BodySize: int64(len(body)), Replayable: true,
				}, 24*time.Hour)
				if err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64((processCPU(b)-cpuStart).Nanoseconds())/float64(b.N), "cpu-ns/op")
		})
	}
}
