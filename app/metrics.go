package app

import (
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/openai-idempotent-proxy/proxy/handlers/proxy"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// newMetrics adds the series only the app can see: the request log queue
// and the database connection pool.
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
	if sqlDB, err := store.DB().DB(); err == nil {
		m.Registry.MustRegister(collectors.NewDBStatsCollector(sqlDB, string(store.Dialect())))
	}
	return m
}
