package dashboard

import (
	"errors"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/openai-idempotent-proxy/proxy/models"
)

// keysPage is the data of dashboard/keys.
type keysPage struct {
	layout
	Key, State string // the search form
	States     []stateChoice
	Rows       []keyRow
	TTL        time.Duration
	Error      string
	Notice     string
	Older      string // URL of the next page, or ""
	Newest     string // URL of the first page, when not on it
	Filtered   bool
}

type stateChoice struct{ Value, Label string }

var keyStates = []stateChoice{
	{models.StateInProgress, "in flight"}, {models.StateCompleted, "completed"}, {models.StateReleased, "released"},
}

// keyRow is an idempotency record as the dashboard shows it.
type keyRow struct {
	ID, Key, Client, Method, Path string
	State, StateClass             string // label and CSS class
	Detail                        string // what the state means here, or ""
	Status                        int
	Size                          int64
	Stream, Replayable            bool
	Created, Expires              time.Time
	Left                          string // "23h 59m", or "expired"
	Expired                       bool
	Replays                       int
	Joins                         int    // repeats that followed a running attempt
	LastReplay                    string // "3m ago", or ""
	Attempts                      int
	ReleaseReason                 string // why it was released, e.g. "upstream status 500"
	Released                      bool   // a retry with this key executes now
}

func newKeyRow(r *models.IdempotencyRecord, now time.Time) keyRow {
	row := keyRow{
		ID: r.ID, Key: r.IdemKey, Client: r.Client, Method: r.Method, Path: r.Path,
		Status: r.Status, Size: r.BodySize, Stream: r.Stream, Replayable: r.Replayable,
		Created: r.CreatedAt, Expires: r.ExpiresAt, Left: formatLeft(r.ExpiresAt.Sub(now)),
		Expired: !r.ExpiresAt.After(now), Replays: r.ReplayCount, Joins: r.JoinCount, Attempts: r.Attempts, ReleaseReason: strings.ReplaceAll(r.ReleaseReason, "_", " "),
	}
	if r.LastReplayAt != nil {
		row.LastReplay = formatAgo(now, *r.LastReplayAt)
	}
	switch {
	case row.Expired && !(r.State == models.StateInProgress && r.LockedUntil.After(now)):
		row.State, row.StateClass = "expired", "expired"
	case r.State == models.StateInProgress && r.LockedUntil.After(now):
		row.State, row.StateClass = "in flight", "inflight"
	case r.State == models.StateInProgress:
		row.State, row.StateClass, row.Detail = "in flight", "inflight", "lease lapsed"
	case r.State == models.StateCompleted && !r.Replayable:
		row.State, row.StateClass, row.Detail = "completed", "completed", "too large to store"
	case r.State == models.StateCompleted:
		row.State, row.StateClass = "completed", "completed"
	case r.State == models.StateReleased:
		// Released keys are free at once; their expiry only bounds how
		// long the record stays visible here.
		row.State, row.StateClass, row.Detail, row.Released = "released", "released", "retry allowed", true
	default:
		row.State, row.StateClass = r.State, "released"
	}
	return row
}

// Keys lists the stored idempotency keys newest first, with their state
// and expiry, searchable by key (GET /dashboard/keys).
func (h *Handler) Keys(c *fiber.Ctx) error {
	p := keysPage{layout: h.page(c, "Idempotency keys", "keys"), States: keyStates, TTL: h.cfg.IdempotencyTTL,
		Key: formText(c, "key"), State: formText(c, "state")}
	p.Filtered = p.Key != "" || p.State != ""
	if c.Query("deleted") != "" {
		p.Notice = "The key was expired. The next request that carries it will execute again."
	}
	cursor := c.Query("cursor")
	ctx := c.UserContext() // bounded by withQueryTimeout
	page, err := h.cfg.Keys.ListIdempotency(ctx, models.IdempotencyFilter{Key: p.Key, State: p.State, Cursor: cursor, Limit: dashboardPageSize})
	if errors.Is(err, models.ErrInvalidFilter) {
		p.Error = "The state or page position in the address is not valid. Start again from the newest."
		p.Newest = keysURL(p.Key, "", "")
		return render(c, http.StatusBadRequest, "keys", p)
	}
	if err != nil {
		return err
	}
	now := h.cfg.Now().UTC()
	for i := range page.Records {
		p.Rows = append(p.Rows, newKeyRow(&page.Records[i], now))
	}
	if page.Next != "" {
		p.Older = keysURL(p.Key, p.State, page.Next)
	}
	if cursor != "" {
		p.Newest = keysURL(p.Key, p.State, "")
	}
	return render(c, http.StatusOK, "keys", p)
}

func keysURL(key, state, cursor string) string {
	v := url.Values{}
	for _, kv := range [...][2]string{{"key", key}, {"state", state}, {"cursor", cursor}} {
		if kv[1] != "" {
			v.Set(kv[0], kv[1])
		}
	}
	if len(v) == 0 {
		return Prefix + "/keys"
	}
	return Prefix + "/keys?" + v.Encode()
}
