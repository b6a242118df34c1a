package proxy

import (
	"net/http"
	"strconv"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// The proxy's own errors; those the server answers too are handlers.Err*.
var (
	errMissingKey = &handlers.APIError{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "missing_api_key", Outcome: models.OutcomeUnauthorized,
		Message: "You didn't provide a proxy API key. Send it as 'Authorization: Bearer <key>'."}
	errBadHeaderName = &handlers.APIError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "malformed_request", Outcome: models.OutcomeRejected,
		Message: "A request header name is not a valid HTTP token."}
	errUpstreamUnreachable = &handlers.APIError{Status: http.StatusBadGateway, Type: "server_error", Code: "upstream_unreachable", Outcome: models.OutcomeUpstreamError,
		Message: "The upstream API could not be reached."}
	// errClientClosedRequest is logged (as nginx's 499) for a client that
	// left before the upstream answered; the client never reads it.
	errClientClosedRequest = &handlers.APIError{Status: 499, Type: "invalid_request_error", Code: "client_closed_request", Outcome: models.OutcomeClientCancelled,
		Message: "The client closed the connection before the upstream answered."}
	errUpstreamEncoding = &handlers.APIError{Status: http.StatusBadGateway, Type: "server_error", Code: "upstream_bad_encoding", Outcome: models.OutcomeUpstreamError,
		Message: "The upstream API answered in a content coding the proxy cannot decode."}
	errUpstreamCut = &handlers.APIError{Status: http.StatusBadGateway, Type: "server_error", Code: "upstream_cut", Outcome: models.OutcomeUpstreamError,
		Message: "The upstream API closed the connection before its answer was complete."}
	errUpstreamTimeout = &handlers.APIError{Status: http.StatusGatewayTimeout, Type: "server_error", Code: "upstream_timeout", Outcome: models.OutcomeUpstreamError,
		Message: "The upstream API did not answer in time."}
)

// errDuplicateField refuses a JSON body that sends a field admission reads
// (model, stream, an output bound) more than once.
func errDuplicateField(name string) *handlers.APIError {
	return &handlers.APIError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "duplicate_field", Outcome: models.OutcomeRejected,
		Message: "The request body sends " + strconv.Quote(name) + " more than once."}
}
