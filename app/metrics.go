package app

import (
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/openai-idempotent-proxy/proxy/handlers/proxy"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// newMetrics adds the series only the app can see: the request log queue,
// the batches of the keyed statements and the database connection pool.
func newMetrics(store *models.Store, logs *models.LogWriter, logger *slog.Logger) *proxy.Metrics {
	m := proxy.NewMetrics()
	m.Logger = logger
	m.Registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "proxy_log_queue_depth", Help: "Request log records waiting to be written."},
			func() float64 { return float64(logs.QueueLen()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "proxy_log_dropped_total", Help: "Request log records dropped because the queue was full or the database failed."},
			func() float64 { return float64(logs.Dropped()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "proxy_log_written_total", Help: "Request log records written to the database."},
			func() float64 { return float64(logs.Written()) }),
	)
	if store.Shared() { // PostgreSQL batches the keyed statements
		for _, kind := range []string{"claim", "completion"} {
			labels := prometheus.Labels{"kind": kind}
			m.Registry.MustRegister(
				prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "proxy_idempotency_batch_statements_total", ConstLabels: labels,
					Help: "Statements that wrote Idempotency-Key claims or completions, each for the concurrent requests queued together."},
					func() float64 { return float64(store.IdempotencyBatches(kind).Statements) }),
				prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "proxy_idempotency_batch_calls_total", ConstLabels: labels,
					Help: "Claims or completions those statements answered; divided by the statements, the average batch."},
					func() float64 { return float64(store.IdempotencyBatches(kind).Calls) }),
			)
		}
	}
	if sqlDB, err := store.DB().DB(); err == nil {
		m.Registry.MustRegister(collectors.NewDBStatsCollector(sqlDB, string(store.Dialect())))
	}
	return m
}
