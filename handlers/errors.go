package handlers

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"

	"github.com/gofiber/fiber/v2"
	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/valyala/fasthttp"
)

// APIError is an error answered in OpenAI's error JSON shape, which the
// official SDKs parse: {"error":{"message","type","param","code"}}.
type APIError struct {
	Status  int
	Type    string
	Code    string
	Message string
	// Outcome is recorded in the request log for this error.
	Outcome string
}

func (e *APIError) Error() string { return e.Message }

// openAIError is the wire shape.
type openAIError struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    string  `json:"code"`
	} `json:"error"`
}

// WriteAPIError answers err in OpenAI's shape. Errors other than *APIError
// and *fiber.Error become a generic 500 whose text never reaches the client.
func WriteAPIError(c *fiber.Ctx, err error) error {
	e := AsAPIError(err)
	return c.Status(e.Status).JSON(openAIErrorBody(e))
}

func openAIErrorBody(e *APIError) openAIError {
	var body openAIError
	body.Error.Message, body.Error.Type, body.Error.Code = e.Message, e.Type, e.Code
	return body
}

// AsAPIError maps any error to the APIError the client sees.
func AsAPIError(err error) *APIError {
	var apiErr *APIError
	if errors.As(err, &apiErr) {
		return apiErr
	}
	var fe *fiber.Error
	if errors.As(err, &fe) {
		return &APIError{Status: fe.Code, Type: errorType(fe.Code), Code: codeFor(fe.Code), Message: publicMessage(fe)}
	}
	return &APIError{Status: http.StatusInternalServerError, Type: "server_error", Code: "internal_error", Message: "The proxy failed to handle the request."}
}

// publicMessage keeps Fiber's own messages for client errors (they describe
// the request) and hides everything else.
func publicMessage(fe *fiber.Error) string {
	if fe.Code >= 400 && fe.Code < 500 {
		return fe.Message
	}
	return http.StatusText(fe.Code)
}

func errorType(status int) string {
	switch {
	case status == http.StatusUnauthorized:
		return "authentication_error"
	case status == http.StatusNotFound:
		return "not_found_error"
	case status >= 500:
		return "server_error"
	}
	return "invalid_request_error"
}

func codeFor(status int) string {
	switch status {
	case http.StatusNotFound:
		return "not_found"
	case http.StatusMethodNotAllowed:
		return "method_not_allowed"
	case http.StatusRequestEntityTooLarge:
		return "request_too_large"
	case http.StatusRequestHeaderFieldsTooLarge:
		return "request_headers_too_large"
	case http.StatusRequestTimeout:
		return "request_timeout"
	}
	if status >= 500 {
		return "server_error"
	}
	return "invalid_request"
}

// The errors answered before a request reaches a handler, and those the
// HTTP proxy answers too (Err*).
var (
	ErrBodyTooLarge = &APIError{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error", Code: "request_too_large", Outcome: models.OutcomeRejected,
		Message: "The request body is larger than this proxy accepts (MAX_BODY_SIZE)."}
	errBadPath = &APIError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "invalid_path", Outcome: models.OutcomeRejected,
		Message: "The request path is not valid."}
	ErrMethodNotAllowed = &APIError{Status: http.StatusMethodNotAllowed, Type: "invalid_request_error", Code: "method_not_allowed", Outcome: models.OutcomeRejected,
		Message: "This method is not proxied."}
	ErrInvalidKey = &APIError{Status: http.StatusUnauthorized, Type: "invalid_request_error", Code: "invalid_api_key", Outcome: models.OutcomeUnauthorized,
		Message: "Incorrect proxy API key provided."}
	ErrBadBody = &APIError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "invalid_request_body", Outcome: models.OutcomeRejected,
		Message: "The request body could not be read: its framing is malformed or it ended early."}
	errMalformedRequest = &APIError{Status: http.StatusBadRequest, Type: "invalid_request_error", Code: "malformed_request", Outcome: models.OutcomeRejected,
		Message: "The request could not be parsed as HTTP/1.1."}
	errHeadersTooLarge = &APIError{Status: http.StatusRequestHeaderFieldsTooLarge, Type: "invalid_request_error", Code: "request_headers_too_large", Outcome: models.OutcomeRejected,
		Message: "The request headers are larger than this proxy accepts."}
	errRequestTimeout = &APIError{Status: http.StatusRequestTimeout, Type: "invalid_request_error", Code: "request_timeout", Outcome: models.OutcomeRejected,
		Message: "The request was not received in time."}
	errUnknownRoute = &APIError{Status: http.StatusNotFound, Type: "invalid_request_error", Code: "unknown_url", Outcome: models.OutcomeRejected,
		Message: "Unknown request URL. The proxy serves the OpenAI API under /v1/."}
)

// ServerErrorHandler answers requests that fail before any handler runs
// (unparsable request line or headers, oversized headers, a body that ends
// early, timeouts) in OpenAI's error shape. Unlike fasthttp's default, it
// never quotes the request back: that text holds the client's headers,
// Authorization included.
func ServerErrorHandler(ctx *fasthttp.RequestCtx, err error) {
	e := errMalformedRequest
	var small *fasthttp.ErrSmallBuffer
	var netErr net.Error
	switch {
	case errors.As(err, &small):
		e = errHeadersTooLarge
	case errors.As(err, &netErr) && netErr.Timeout(), errors.Is(err, fasthttp.ErrTimeout):
		e = errRequestTimeout
	case errors.Is(err, fasthttp.ErrBodyTooLarge):
		e = ErrBodyTooLarge
	case errors.Is(err, io.ErrUnexpectedEOF), errors.As(err, new(*fasthttp.ErrBrokenChunk)):
		e = ErrBadBody
	}
	writeRawAPIError(ctx, e)
	ctx.SetConnectionClose()
}

// RejectUnknownMethods answers methods outside HTTP's registered set (and
// lowercase ones, which are different tokens) in OpenAI's error shape,
// before the router would answer them in plain text.
func RejectUnknownMethods(next fasthttp.RequestHandler) fasthttp.RequestHandler {
	return func(ctx *fasthttp.RequestCtx) {
		switch string(ctx.Method()) {
		case fiber.MethodGet, fiber.MethodHead, fiber.MethodPost, fiber.MethodPut, fiber.MethodPatch,
			fiber.MethodDelete, fiber.MethodOptions, fiber.MethodConnect, fiber.MethodTrace:
			next(ctx)
		default:
			writeRawAPIError(ctx, ErrMethodNotAllowed)
		}
	}
}

func writeRawAPIError(ctx *fasthttp.RequestCtx, e *APIError) {
	ctx.Response.Reset()
	ctx.SetStatusCode(e.Status)
	ctx.SetContentType(fiber.MIMEApplicationJSON)
	ctx.SetBody(APIErrorBody(e))
}

// APIErrorBody is the JSON answering e, for responses written without a
// *fiber.Ctx.
func APIErrorBody(e *APIError) []byte {
	body, _ := json.Marshal(openAIErrorBody(e))
	return body
}
