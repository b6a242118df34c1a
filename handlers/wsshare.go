package handlers

import (
	"net/url"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// What the WebSocket proxy (handlers/wsproxy) shares with the HTTP proxy,
// so both read paths and build upstream URLs the same way.

// NormalisePath is normalisePath for other packages: the /v1 path to
// forward, or the error to answer.
func NormalisePath(raw string) (string, *APIError) { return normalisePath(raw) }

// UpstreamURL joins the upstream base URL and a normalised /v1 path and
// query, as the HTTP proxy does.
func UpstreamURL(base *url.URL, normalised string, rawQuery []byte) string {
	return upstreamURL(base, normalised, rawQuery)
}

// ObserveRequest counts a finished request (a WebSocket session) in
// /metrics, like every proxied HTTP request.
func (m *Metrics) ObserveRequest(rec models.RequestLog) { m.observe(&rec, 0) }
