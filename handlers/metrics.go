package handlers

import (
	"crypto/sha256"
	"crypto/subtle"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/adaptor"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// Metrics are the Prometheus series the proxy exports at /metrics. All
// methods are safe on a nil *Metrics, which records nothing.
type Metrics struct {
	Registry       *prometheus.Registry
	requests       *prometheus.CounterVec
	duration       *prometheus.HistogramVec
	ttfb           *prometheus.HistogramVec
	upstreamErrors *prometheus.CounterVec
	idempotency    *prometheus.CounterVec
	released       *prometheus.CounterVec
	streams        prometheus.Gauge
	tokens         *prometheus.CounterVec
	upstreamConns  *prometheus.CounterVec
}

// LLM calls last from milliseconds to many minutes.
var latencyBuckets = []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}

// NewMetrics registers the proxy's series, plus Go runtime and process
// metrics, on a registry of its own.
func NewMetrics() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "proxy_requests_total",
			Help: "Requests under /v1 by route, status class, model, client and outcome."},
			[]string{"route", "status_class", "model", "client", "outcome"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "proxy_request_duration_seconds",
			Help: "Time from request arrival to the last response byte.", Buckets: latencyBuckets}, []string{"route"}),
		ttfb: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "proxy_time_to_first_byte_seconds",
			Help: "Time from request arrival to the first upstream response byte.", Buckets: latencyBuckets}, []string{"route"}),
		upstreamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "proxy_upstream_errors_total",
			Help: "Upstream calls that failed: unreachable, timeout, or cut mid-response."}, []string{"kind"}),
		idempotency: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "proxy_idempotency_total",
			Help: "Keyed requests by result: executed, taken_over, replayed, conflict, mismatch, invalid, gone, unavailable."}, []string{"result"}),
		released: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "proxy_idempotency_released_total",
			Help: "Idempotency claims given back so a retry executes, by reason."}, []string{"reason"}),
		streams: prometheus.NewGauge(prometheus.GaugeOpts{Name: "proxy_inflight_streams",
			Help: "Server-sent event streams being relayed now."}),
		tokens: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "proxy_tokens_total",
			Help: "Tokens reported by upstream, by kind (prompt, completion)."}, []string{"kind"}),
		upstreamConns: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "proxy_upstream_connections_total",
			Help: "Pooled upstream connections found closed before use (stale), and requests sent again because the upstream provably never read them (resent)."}, []string{"event"}),
	}
	for _, event := range []string{"stale", "resent"} {
		m.upstreamConns.WithLabelValues(event)
	}
	m.Registry.MustRegister(m.requests, m.duration, m.ttfb, m.upstreamErrors, m.idempotency, m.released, m.streams, m.tokens, m.upstreamConns,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Handler serves the registry, behind a bearer token when one is set.
func (m *Metrics) Handler(token string) fiber.Handler {
	serve := adaptor.HTTPHandler(promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	want := sha256.Sum256([]byte("Bearer " + token))
	return func(c *fiber.Ctx) error {
		if token != "" {
			got := sha256.Sum256(c.Request().Header.Peek("Authorization"))
			if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
				return WriteAPIError(c, &APIError{Status: fiber.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_metrics_token",
					Message: "Send the metrics token as 'Authorization: Bearer <METRICS_TOKEN>'."})
			}
		}
		return serve(c)
	}
}

func (m *Metrics) observe(rec *models.RequestLog, ttfb time.Duration) {
	if m == nil {
		return
	}
	route := routeLabel(rec.Path)
	class := "none"
	if rec.Status > 0 {
		class = strconv.Itoa(rec.Status/100) + "xx"
	}
	m.requests.WithLabelValues(route, class, modelLabel(rec.Model), rec.Client, rec.Outcome).Inc()
	m.duration.WithLabelValues(route).Observe(float64(rec.DurationMs) / 1000)
	if ttfb > 0 {
		m.ttfb.WithLabelValues(route).Observe(ttfb.Seconds())
	}
	if rec.PromptTokens > 0 || rec.CompletionTokens > 0 {
		m.tokens.WithLabelValues("prompt").Add(float64(rec.PromptTokens))
		m.tokens.WithLabelValues("completion").Add(float64(rec.CompletionTokens))
	}
}

func (m *Metrics) upstreamError(kind string) {
	if m != nil {
		m.upstreamErrors.WithLabelValues(kind).Inc()
	}
}

func (m *Metrics) idempotencyResult(result string) {
	if m != nil {
		m.idempotency.WithLabelValues(result).Inc()
	}
}

func (m *Metrics) releasedClaim(reason string) {
	if m != nil {
		m.released.WithLabelValues(reason).Inc()
	}
}

func (m *Metrics) streamStarted() {
	if m != nil {
		m.streams.Inc()
	}
}

func (m *Metrics) streamEnded() {
	if m != nil {
		m.streams.Dec()
	}
}

// routeLabel keeps label cardinality bounded: path segments that look like
// ids (anything with a digit, or long) become ":id".
func routeLabel(path string) string {
	if path == "" {
		return "none"
	}
	segs := strings.Split(strings.TrimPrefix(path, "/"), "/")
	if len(segs) > 4 {
		segs = append(segs[:4], "…")
	}
	for i, s := range segs {
		if i > 0 && (len(s) > 32 || strings.ContainsAny(s, "0123456789:.")) { // segs[0] is "v1"
			segs[i] = ":id"
		}
	}
	return "/" + strings.Join(segs, "/")
}

// modelLabel bounds the model label: clients choose it freely.
func modelLabel(model string) string {
	if model == "" {
		return "none"
	}
	if len(model) > 64 {
		return "other"
	}
	for _, r := range model {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_.:/@", r)) {
			return "other"
		}
	}
	return model
}

// upstreamConn counts a stale pooled connection or a resent request.
func (m *Metrics) upstreamConn(event string) {
	if m != nil {
		m.upstreamConns.WithLabelValues(event).Inc()
	}
}
