package dashboard

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// requestsPage is the data of dashboard/requests.
type requestsPage struct {
	layout
	Filter   requestFilter
	Outcomes []string
	Rows     []models.RequestLog
	Error    string // a filter that could not be used
	Older    string // URL of the next page, or ""
	Newest   string // URL of the first page, when not on it
	Filtered bool
}

// requestFilter is the filter form, as typed.
type requestFilter struct {
	Status, Model, Path, Client, Key, Outcome, From, To string
}

// listTimeout bounds one search of the request log.
const listTimeout = 1500 * time.Millisecond

// datetimeLayout is what <input type="datetime-local"> sends.
const datetimeLayout = "2006-01-02T15:04"

// outcomes offered by the filter form.
var outcomes = []string{
	models.OutcomeProxied, models.OutcomeReplayed, models.OutcomeJoined, models.OutcomeIdempotencyConflict,
	models.OutcomeIdempotencyMismatch, models.OutcomeIdempotencyInvalid, models.OutcomeIdempotencyGone,
	models.OutcomeIdempotencyDown, models.OutcomeUnauthorized, models.OutcomeRejected,
	models.OutcomeUpstreamError, models.OutcomeClientCancelled,
}

// Requests lists the request log newest first, filtered, one keyset page
// at a time (GET /dashboard/requests).
func (h *Handler) Requests(c *fiber.Ctx) error {
	p := requestsPage{layout: h.page(c, "Requests", "requests"), Outcomes: outcomes}
	f := requestFilter{
		Status: formText(c, "status"), Model: formText(c, "model"), Path: formText(c, "path"),
		Client: formText(c, "client"), Key: formText(c, "key"), Outcome: formText(c, "outcome"),
		From: formText(c, "from"), To: formText(c, "to"),
	}
	p.Filter = f
	p.Filtered = f != (requestFilter{})
	lf, err := f.parse()
	if err != nil {
		p.Error = err.Error()
		return render(c, http.StatusBadRequest, "requests", p)
	}
	if lf.StatusClass != 0 {
		// ?status=5xx and ?status=5 filter alike; the dropdown's option
		// values are the digit, so show the choice it filters by.
		p.Filter.Status = strconv.Itoa(lf.StatusClass)
	}
	lf.Cursor, lf.Limit = c.Query("cursor"), dashboardPageSize
	ctx, cancel := context.WithTimeout(c.UserContext(), listTimeout)
	defer cancel()
	page, err := h.cfg.Logs.ListRequestLogs(ctx, lf)
	if err != nil && ctx.Err() != nil && c.UserContext().Err() == nil {
		// Each filter has its index, but a combination that matches
		// almost nothing walks one index through the whole log (1–2 s at
		// 10M rows). Stop, say so, and leave the database alone.
		h.cfg.Logger.Warn("dashboard: request log search timed out", "filter", p.Filter.url(""))
		p.Error = "Few requests match this combination of filters, and searching the whole log for them took too long. Add a time range (From, To) to narrow the search."
		return render(c, http.StatusOK, "requests", p)
	}
	if errors.Is(err, models.ErrInvalidFilter) {
		p.Error = "The page position in the address is not valid; showing nothing. Start again from the newest."
		p.Newest = f.url("")
		return render(c, http.StatusBadRequest, "requests", p)
	}
	if err != nil {
		return err
	}
	p.Rows = page.Logs
	if page.Next != "" {
		p.Older = f.url(page.Next)
	}
	if lf.Cursor != "" {
		p.Newest = f.url("")
	}
	return render(c, http.StatusOK, "requests", p)
}

// formError is a message about the filter form, shown as is.
type formError string

func (e formError) Error() string { return string(e) }

// parse checks the form and turns it into a models.LogFilter.
func (f requestFilter) parse() (models.LogFilter, error) {
	lf := models.LogFilter{Model: f.Model, Path: f.Path, Client: f.Client, IdempotencyKey: f.Key}
	switch s := strings.TrimSuffix(strings.ToLower(f.Status), "xx"); s {
	case "":
	case "2", "3", "4", "5":
		lf.StatusClass = int(s[0] - '0')
	default:
		return lf, formError("Status must be 2xx, 3xx, 4xx or 5xx.")
	}
	if f.Outcome != "" {
		known := false
		for _, o := range outcomes {
			known = known || o == f.Outcome
		}
		if !known {
			return lf, formError("Unknown outcome.")
		}
		lf.Outcome = f.Outcome
	}
	var err error
	if lf.From, err = parseFormTime(f.From); err != nil {
		return lf, formError("“From” must be a date and time like 2025-01-31T14:00 (UTC).")
	}
	if lf.To, err = parseFormTime(f.To); err != nil {
		return lf, formError("“To” must be a date and time like 2025-01-31T15:00 (UTC).")
	}
	if !lf.From.IsZero() && !lf.To.IsZero() && !lf.From.Before(lf.To) {
		return lf, formError("“From” must be before “To”.")
	}
	return lf, nil
}

func parseFormTime(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	for _, layout := range []string{datetimeLayout, datetimeLayout + ":05", time.RFC3339} {
		if t, err := time.ParseInLocation(layout, s, time.UTC); err == nil {
			return t.UTC(), nil
		}
	}
	return time.Time{}, errors.New("bad time")
}

// url is the list's address with this filter and cursor.
func (f requestFilter) url(cursor string) string {
	v := url.Values{}
	for _, kv := range [...][2]string{
		{"status", f.Status}, {"model", f.Model}, {"path", f.Path}, {"client", f.Client},
		{"key", f.Key}, {"outcome", f.Outcome}, {"from", f.From}, {"to", f.To}, {"cursor", cursor},
	} {
		if kv[1] != "" {
			v.Set(kv[0], kv[1])
		}
	}
	if len(v) == 0 {
		return Prefix + "/requests"
	}
	return Prefix + "/requests?" + v.Encode()
}

// formText reads a query parameter, trimmed and bounded.
func formText(c *fiber.Ctx, name string) string {
	v := strings.TrimSpace(c.Query(name))
	if len(v) > 300 {
		v = v[:300]
	}
	return strings.Clone(v)
}
