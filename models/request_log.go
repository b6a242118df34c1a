package models

import "time"

// Outcomes of a proxied request, as recorded in request_logs.outcome.
const (
	OutcomeProxied             = "proxied"              // forwarded upstream, response delivered
	OutcomeReplayed            = "replayed"             // answered from a stored idempotency record
	OutcomeJoined              = "joined"               // a repeat that followed the running attempt of its key
	OutcomeIdempotencyConflict = "idempotency_conflict" // 409: the same key is still in progress
	OutcomeIdempotencyMismatch = "idempotency_mismatch" // 422: the key was used for a different request
	OutcomeIdempotencyInvalid  = "idempotency_invalid"  // 400: malformed Idempotency-Key
	OutcomeIdempotencyGone     = "idempotency_gone"     // 410: executed, but too large to replay
	OutcomeIdempotencyDown     = "idempotency_unavailable"
	OutcomeUnauthorized        = "unauthorized"     // 401: no valid client key
	OutcomeRejected            = "rejected"         // 4xx from the proxy itself (413, 404, …)
	OutcomeUpstreamError       = "upstream_error"   // upstream unreachable, timed out or cut off
	OutcomeClientCancelled     = "client_cancelled" // the client went away before the end
)

// RequestLog is one row of request_logs: everything about one request except
// its bodies and secrets.
type RequestLog struct {
	ID                int64     `gorm:"primaryKey"`
	CreatedAt         time.Time // when the request arrived, UTC
	Client            string    // client key name, never the key
	Method            string
	Path              string // normalised, e.g. /v1/chat/completions
	Model             string
	Stream            bool
	Status            int
	Outcome           string
	DurationMs        int64
	TTFBMs            int64 `gorm:"column:ttfb_ms"`
	RequestBytes      int64
	ResponseBytes     int64
	PromptTokens      int64
	CompletionTokens  int64
	TotalTokens       int64
	CachedTokens      int64
	ReasoningTokens   int64
	CostMicros        int64 // USD x 1e6 at the price table's rates; 0 for unknown models
	UpstreamRequestID string
	IdempotencyKey    string
	Error             string
	ClientIP          string `gorm:"column:client_ip"`
	UserAgent         string
}
