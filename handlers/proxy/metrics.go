package proxy

import (
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/adaptor"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/tidwall/gjson"
	"golang.org/x/time/rate"

	"github.com/openai-idempotent-proxy/proxy/handlers"
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
	cost           *prometheus.CounterVec
	upstreamConns  *prometheus.CounterVec
	models         modelLabels
	upstreamAuth   *prometheus.CounterVec
	// The by* fields and the token series cache what observe and
	// idempotencyResult would find by label values, so a request does no
	// label hashing: every label is bounded.
	byRoute   sync.Map                      // route → *routeSeries
	byRequest sync.Map                      // requestLabels → prometheus.Counter
	byCost    sync.Map                      // [2]string{client, model} → prometheus.Counter
	byResult  map[string]prometheus.Counter // idempotency result → series, made at start
	// proxy_tokens_total's two series.
	promptTokens, completionTokens prometheus.Counter

	// Logger receives the upstream key warnings; nil: slog.Default().
	Logger *slog.Logger
	// keyRejectedAt is the Unix time in nanoseconds of the last upstream
	// 401 invalid_api_key; 0: none since start.
	keyRejectedAt      atomic.Int64
	keyRejections      atomic.Int64 // upstream 401 invalid_api_key, for the log line
	otherAuthFailures  atomic.Int64 // other upstream 401s, for the log line
	logKeyRejected     rate.Sometimes
	logOtherAuthFailed rate.Sometimes
}

// The label values of proxy_idempotency_total, _released_total (besides
// upstream_status_NNN) and proxy_upstream_errors_total.
var (
	idempotencyResults = []string{"executed", "taken_over", "replayed", "joined", "conflict", "mismatch", "invalid", "gone", "unavailable"}
	releaseReasons     = []string{"incomplete", "stream_incomplete", "upstream_timeout", "upstream_error", "client_gone"}
	upstreamErrorKinds = []string{"unreachable", "first_byte_timeout", "cut_mid_response"}
)

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
			Help: "Keyed requests by result: executed, taken_over, replayed, joined (a repeat that followed the running attempt), conflict, mismatch, invalid, gone, unavailable."}, []string{"result"}),
		released: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "proxy_idempotency_released_total",
			Help: "Idempotency claims given back so a retry executes, by reason."}, []string{"reason"}),
		streams: prometheus.NewGauge(prometheus.GaugeOpts{Name: "proxy_inflight_streams",
			Help: "Server-sent event streams being relayed now."}),
		tokens: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "proxy_tokens_total",
			Help: "Tokens reported by upstream, by kind (prompt, completion)."}, []string{"kind"}),
		cost: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "proxy_cost_usd_total",
			Help: "Spend in USD at the price table's rates, by client key name and model (the model label bounded like proxy_requests_total's)."},
			[]string{"client", "model"}),
		upstreamConns: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "proxy_upstream_connections_total",
			Help: "Pooled upstream connections found closed before use (stale), and requests sent again because the upstream provably never read them (resent)."}, []string{"event"}),
		upstreamAuth: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "proxy_upstream_auth_failures_total",
			Help: "Upstream 401 answers, which concern OPENAI_API_KEY (clients' keys never go upstream), by error code: invalid_api_key or other."}, []string{"code"}),
		logKeyRejected:     rate.Sometimes{Interval: upstreamAuthLogEvery},
		logOtherAuthFailed: rate.Sometimes{Interval: upstreamAuthLogEvery},
	}
	keyRejected := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "proxy_upstream_key_rejected_timestamp_seconds",
		Help: "Unix time of the last upstream 401 invalid_api_key (OPENAI_API_KEY refused); 0: none since start."},
		func() float64 {
			if at := m.UpstreamKeyRejectedAt(); !at.IsZero() {
				return float64(at.UnixNano()) / 1e9
			}
			return 0
		})
	for _, c := range []string{"invalid_api_key", "other"} {
		m.upstreamAuth.WithLabelValues(c)
	}
	// Series with a known set of label values exist from the start, at
	// zero, so dashboards and alerts (rate, increase) see them before the
	// first event.
	m.byResult = make(map[string]prometheus.Counter, len(idempotencyResults))
	for _, r := range idempotencyResults {
		m.byResult[r] = m.idempotency.WithLabelValues(r)
	}
	for _, r := range releaseReasons {
		m.released.WithLabelValues(r)
	}
	for _, k := range upstreamErrorKinds {
		m.upstreamErrors.WithLabelValues(k)
	}
	m.promptTokens, m.completionTokens = m.tokens.WithLabelValues("prompt"), m.tokens.WithLabelValues("completion")
	for _, event := range []string{"stale", "resent"} {
		m.upstreamConns.WithLabelValues(event)
	}
	m.Registry.MustRegister(m.requests, m.duration, m.ttfb, m.upstreamErrors, m.idempotency, m.released, m.streams, m.tokens, m.cost,
		m.upstreamAuth, keyRejected, m.upstreamConns,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Handler serves the registry, behind a bearer token when one is set.
func (m *Metrics) Handler(token string) fiber.Handler {
	serve := adaptor.HTTPHandler(promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	want := handlers.DigestSecret([]byte("Bearer " + token))
	return func(c *fiber.Ctx) error {
		if token != "" {
			if !want.Matches(c.Request().Header.Peek("Authorization")) {
				return handlers.WriteAPIError(c, &handlers.APIError{Status: fiber.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_metrics_token",
					Message: "Send the metrics token as 'Authorization: Bearer <METRICS_TOKEN>'."})
			}
		}
		return serve(c)
	}
}

// routeSeries are the series of one route label.
type routeSeries struct{ duration, ttfb prometheus.Observer }

// requestLabels are proxy_requests_total's label values.
type requestLabels struct{ route, class, model, client, outcome string }

var statusClasses = [...]string{"0xx", "1xx", "2xx", "3xx", "4xx", "5xx", "6xx", "7xx", "8xx", "9xx"}

func (m *Metrics) observe(rec *models.RequestLog, ttfb time.Duration) {
	if m == nil {
		return
	}
	route := routeLabel(rec.Path)
	class := "none"
	if rec.Status > 0 {
		if c := rec.Status / 100; c < len(statusClasses) {
			class = statusClasses[c]
		} else {
			class = strconv.Itoa(c) + "xx"
		}
	}
	model := m.models.label(rec.Model, rec.Status)
	labels := requestLabels{route, class, model, rec.Client, rec.Outcome}
	requests, ok := m.byRequest.Load(labels)
	if !ok {
		requests, _ = m.byRequest.LoadOrStore(labels, m.requests.WithLabelValues(route, class, model, rec.Client, rec.Outcome))
	}
	requests.(prometheus.Counter).Inc()
	if rec.CostMicros > 0 {
		key := [2]string{rec.Client, model}
		cost, ok := m.byCost.Load(key)
		if !ok {
			cost, _ = m.byCost.LoadOrStore(key, m.cost.WithLabelValues(rec.Client, model))
		}
		cost.(prometheus.Counter).Add(float64(rec.CostMicros) / 1e6)
	}
	series, ok := m.byRoute.Load(route)
	if !ok {
		series, _ = m.byRoute.LoadOrStore(route, &routeSeries{duration: m.duration.WithLabelValues(route), ttfb: m.ttfb.WithLabelValues(route)})
	}
	rs := series.(*routeSeries)
	rs.duration.Observe(float64(rec.DurationMs) / 1000)
	if ttfb > 0 {
		rs.ttfb.Observe(ttfb.Seconds())
	}
	if rec.PromptTokens > 0 || rec.CompletionTokens > 0 {
		m.promptTokens.Add(float64(rec.PromptTokens))
		m.completionTokens.Add(float64(rec.CompletionTokens))
	}
}

// ObserveRequest counts a finished request (a WebSocket session) in
// /metrics, like every proxied HTTP request.
func (m *Metrics) ObserveRequest(rec models.RequestLog) { m.observe(&rec, 0) }

// upstreamAuthLogEvery is how often an upstream refusing OPENAI_API_KEY
// is logged: every request fails then, so once a minute is enough.
const upstreamAuthLogEvery = time.Minute

// upstreamAnswered notices upstream refusing OPENAI_API_KEY. The client's
// own key never goes upstream, so an upstream 401 is about the server's
// key, although the client sees a 401 that reads like a bad proxy key.
func (m *Metrics) upstreamAnswered(ex *exchange) {
	if m == nil || ex.headersAt.IsZero() || ex.status != fiber.StatusUnauthorized {
		return
	}
	body := ex.tail
	if ex.claim != nil {
		body = ex.claim.capture
	}
	logger := m.Logger
	if logger == nil {
		logger = slog.Default()
	}
	code := gjson.GetBytes(body, "error.code").String()
	if code != "invalid_api_key" {
		m.upstreamAuth.WithLabelValues("other").Inc()
		n := m.otherAuthFailures.Add(1)
		m.logOtherAuthFailed.Do(func() {
			logger.Warn("upstream answered 401 to OPENAI_API_KEY: the key may lack access to this route, or the upstream wants other credentials",
				"path", ex.rec.Path, "code", truncate(code, 100), "upstream_401s", n)
		})
		return
	}
	m.upstreamAuth.WithLabelValues(code).Inc()
	n := m.keyRejections.Add(1)
	m.keyRejectedAt.Store(time.Now().UnixNano())
	m.logKeyRejected.Do(func() {
		logger.Error("upstream rejects OPENAI_API_KEY (401 invalid_api_key): every request fails and clients see 401 until the key is fixed; their proxy keys are fine",
			"upstream_rejections", n, "logged_every", upstreamAuthLogEvery.String())
	})
}

// UpstreamKeyRejectedAt is when upstream last refused OPENAI_API_KEY
// (401 invalid_api_key), or the zero time if it has not since start. The
// dashboard shows a banner while it is recent.
func (m *Metrics) UpstreamKeyRejectedAt() time.Time {
	if m == nil {
		return time.Time{}
	}
	if ns := m.keyRejectedAt.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

func (m *Metrics) upstreamError(kind string) {
	if m != nil {
		m.upstreamErrors.WithLabelValues(kind).Inc()
	}
}

func (m *Metrics) idempotencyResult(result string) {
	if m == nil {
		return
	}
	if c, ok := m.byResult[result]; ok {
		c.Inc()
		return
	}
	m.idempotency.WithLabelValues(result).Inc()
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

// Label values are bounded: a client with a key chooses its models and
// paths freely, and every distinct value would be a series kept until
// restart. Routes are matched against OpenAI's API templates, models are
// admitted once upstream has accepted them, and the rest folds into "other".

// routeTemplates are OpenAI's API routes; ":id" stands for one path segment.
var routeTemplates = newRouteTree(
	"/v1/chat/completions", "/v1/chat/completions/:id", "/v1/chat/completions/:id/messages",
	"/v1/completions", "/v1/embeddings", "/v1/moderations",
	"/v1/models", "/v1/models/:id",
	"/v1/responses", "/v1/responses/:id", "/v1/responses/:id/cancel", "/v1/responses/:id/input_items",
	"/v1/responses/input_tokens", "/v1/responses/compact",
	"/v1/conversations", "/v1/conversations/:id", "/v1/conversations/:id/items", "/v1/conversations/:id/items/:id",
	"/v1/audio/speech", "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/audio/voices",
	"/v1/images/generations", "/v1/images/edits", "/v1/images/variations",
	"/v1/files", "/v1/files/:id", "/v1/files/:id/content",
	"/v1/uploads", "/v1/uploads/:id/parts", "/v1/uploads/:id/complete", "/v1/uploads/:id/cancel",
	"/v1/batches", "/v1/batches/:id", "/v1/batches/:id/cancel",
	"/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/:id", "/v1/fine_tuning/jobs/:id/cancel",
	"/v1/fine_tuning/jobs/:id/pause", "/v1/fine_tuning/jobs/:id/resume",
	"/v1/fine_tuning/jobs/:id/events", "/v1/fine_tuning/jobs/:id/checkpoints",
	"/v1/fine_tuning/checkpoints/:id/permissions", "/v1/fine_tuning/checkpoints/:id/permissions/:id",
	"/v1/fine_tuning/alpha/graders/run", "/v1/fine_tuning/alpha/graders/validate",
	"/v1/vector_stores", "/v1/vector_stores/:id", "/v1/vector_stores/:id/search",
	"/v1/vector_stores/:id/files", "/v1/vector_stores/:id/files/:id", "/v1/vector_stores/:id/files/:id/content",
	"/v1/vector_stores/:id/file_batches", "/v1/vector_stores/:id/file_batches/:id",
	"/v1/vector_stores/:id/file_batches/:id/cancel", "/v1/vector_stores/:id/file_batches/:id/files",
	"/v1/assistants", "/v1/assistants/:id",
	"/v1/threads", "/v1/threads/runs", "/v1/threads/:id",
	"/v1/threads/:id/messages", "/v1/threads/:id/messages/:id",
	"/v1/threads/:id/runs", "/v1/threads/:id/runs/:id", "/v1/threads/:id/runs/:id/cancel",
	"/v1/threads/:id/runs/:id/submit_tool_outputs", "/v1/threads/:id/runs/:id/steps", "/v1/threads/:id/runs/:id/steps/:id",
	"/v1/realtime", "/v1/realtime/sessions", "/v1/realtime/transcription_sessions", "/v1/realtime/client_secrets",
	"/v1/realtime/calls", "/v1/realtime/calls/:id/accept", "/v1/realtime/calls/:id/hangup",
	"/v1/realtime/calls/:id/refer", "/v1/realtime/calls/:id/reject",
	"/v1/evals", "/v1/evals/:id", "/v1/evals/:id/runs", "/v1/evals/:id/runs/:id",
	"/v1/evals/:id/runs/:id/output_items", "/v1/evals/:id/runs/:id/output_items/:id",
	"/v1/containers", "/v1/containers/:id", "/v1/containers/:id/files",
	"/v1/containers/:id/files/:id", "/v1/containers/:id/files/:id/content",
	"/v1/videos", "/v1/videos/:id", "/v1/videos/:id/content", "/v1/videos/:id/remix",
)

// routeTree matches a path segment by segment, a literal before ":id".
type routeTree struct {
	children map[string]*routeTree
	template string // set where a template ends
}

func newRouteTree(templates ...string) *routeTree {
	root := &routeTree{}
	for _, tpl := range templates {
		n := root
		for _, seg := range strings.Split(strings.TrimPrefix(tpl, "/"), "/") {
			if n.children == nil {
				n.children = map[string]*routeTree{}
			}
			if n.children[seg] == nil {
				n.children[seg] = &routeTree{}
			}
			n = n.children[seg]
		}
		n.template = tpl
	}
	return root
}

// match matches the segments of rest, the path after its leading "/";
// done says none are left.
func (n *routeTree) match(rest string, done bool) string {
	if done {
		return n.template
	}
	seg, after, more := strings.Cut(rest, "/")
	if child := n.children[seg]; child != nil {
		if tpl := child.match(after, !more); tpl != "" {
			return tpl
		}
	}
	if child := n.children[":id"]; child != nil && seg != "" {
		return child.match(after, !more)
	}
	return ""
}

// routeLabel names the OpenAI route template a path matches, "none" for a
// request refused before its path was read, or "other".
func routeLabel(path string) string {
	if path == "" {
		return "none"
	}
	if tpl := routeTemplates.match(strings.TrimPrefix(path, "/"), false); tpl != "" {
		return tpl
	}
	return "other"
}

// maxModelLabels bounds the distinct model label values.
const maxModelLabels = 100

// modelLabels admits a model name as a label value once upstream answered
// a request for it with 2xx, so only models that exist get a series, and
// at most maxModelLabels of them.
type modelLabels struct {
	mu   sync.Mutex
	seen map[string]bool
}

func (ml *modelLabels) label(model string, status int) string {
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
	ml.mu.Lock()
	defer ml.mu.Unlock()
	if ml.seen[model] {
		return model
	}
	if status/100 == 2 && len(ml.seen) < maxModelLabels {
		if ml.seen == nil {
			ml.seen = map[string]bool{}
		}
		ml.seen[model] = true
		return model
	}
	return "other"
}

// upstreamConn counts a stale pooled connection or a resent request.
func (m *Metrics) upstreamConn(event string) {
	if m != nil {
		m.upstreamConns.WithLabelValues(event).Inc()
	}
}

// bufferBytes exports what the proxy holds of BUFFER_MEMORY_LIMIT.
func (m *Metrics) bufferBytes(b *bufferBudget) {
	if m == nil {
		return
	}
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "proxy_buffer_bytes",
		Help: "Bytes held now for idempotency captures, replays and inspected request bodies (bounded by BUFFER_MEMORY_LIMIT)."},
		func() float64 { return float64(b.held.Load()) }))
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "proxy_buffer_limit_bytes",
		Help: "BUFFER_MEMORY_LIMIT."}, func() float64 { return float64(b.limit) }))
}
