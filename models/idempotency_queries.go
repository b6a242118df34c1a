package models

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// IdempotencyFilter selects idempotency records for the dashboard's list.
// Zero fields match everything.
type IdempotencyFilter struct {
	// Key matches the client's Idempotency-Key exactly (its index).
	Key string
	// State is StateInProgress, StateCompleted or StateReleased.
	State string
	// Cursor continues a listing: IdempotencyPage.Next of the previous page.
	Cursor string
	// Limit is the page size: default 50, at most 200.
	Limit int
}

// IdempotencyPage is one page of records, newest first. Records carry
// every column except Body, which the list never shows.
type IdempotencyPage struct {
	Records []IdempotencyRecord
	// Next is the cursor of the following page; empty on the last page.
	Next string
}

// idempotencyListColumns are the columns the list reads: all but body, which
// can be megabytes per row.
const idempotencyListColumns = "id, client, method, path, idem_key, fingerprint, state, owner, locked_until, status, headers," +
	" body_size, stream, replayable, replay_count, join_count, last_replay_at, attempts, release_reason, created_at, updated_at, expires_at"

// ListIdempotency pages through idempotency records newest first, by keyset
// on (created_at, id), the order of idempotency_records_created_at_idx: a
// page costs the same at any depth and never uses OFFSET. Expired records
// that the sweeper has not yet deleted are listed too; their ExpiresAt is in
// the past.
func (s *Store) ListIdempotency(ctx context.Context, f IdempotencyFilter) (IdempotencyPage, error) {
	limit := f.Limit
	if limit <= 0 {
		limit = defaultPageSize
	}
	limit = min(limit, maxPageSize)
	q := s.db.WithContext(ctx).Model(&IdempotencyRecord{}).Select(idempotencyListColumns)
	if f.Key != "" {
		q = q.Where("idem_key = ?", f.Key)
	}
	switch f.State {
	case "":
	case StateCompleted:
		// Most keys: the created_at index finds a page at once.
		q = q.Where("state = ?", f.State)
	case StateInProgress, StateReleased:
		// Repeats the predicate of idempotency_records_open_state_idx
		// (00003), which holds only these few rows: with a bound
		// parameter the planner cannot prove it by itself.
		q = q.Where("state = ? AND state <> 'completed'", f.State)
	default:
		return IdempotencyPage{}, fmt.Errorf("models: idempotency state %q: %w", f.State, ErrInvalidFilter)
	}
	if f.Cursor != "" {
		at, id, err := decodeKeyCursor(f.Cursor)
		if err != nil {
			return IdempotencyPage{}, err
		}
		// A row-value comparison is one range on the (created_at, id) index.
		q = q.Where("(created_at, id) < (?, ?)", at, id)
	}
	var recs []IdempotencyRecord
	// One row more than the page tells whether another page exists.
	if err := q.Order("created_at DESC, id DESC").Limit(limit + 1).Find(&recs).Error; err != nil {
		return IdempotencyPage{}, fmt.Errorf("models: list idempotency keys: %w", err)
	}
	for i := range recs {
		utcRecord(&recs[i])
	}
	page := IdempotencyPage{Records: recs}
	if len(recs) > limit {
		page.Records = recs[:limit]
		last := recs[limit-1]
		page.Next = encodeKeyCursor(last.CreatedAt, last.ID)
	}
	return page, nil
}

// utcRecord normalises a record's times to UTC (SQLite returns them in
// the zone they were written in, PostgreSQL in the session's).
func utcRecord(r *IdempotencyRecord) {
	r.CreatedAt, r.UpdatedAt, r.ExpiresAt, r.LockedUntil = r.CreatedAt.UTC(), r.UpdatedAt.UTC(), r.ExpiresAt.UTC(), r.LockedUntil.UTC()
	if r.LastReplayAt != nil {
		t := r.LastReplayAt.UTC()
		r.LastReplayAt = &t
	}
}

// encodeKeyCursor writes a record's position; ids are hex, so the dot
// of the cursor is unambiguous.
func encodeKeyCursor(at time.Time, id string) string { return encodeCursor(at, id) }

func decodeKeyCursor(c string) (time.Time, string, error) {
	at, id, ok := decodeCursor(c, func(id string) bool {
		return id != "" && len(id) <= 128 && strings.Trim(id, "0123456789abcdef") == ""
	})
	if !ok {
		return time.Time{}, "", fmt.Errorf("models: cursor %q: %w", c, ErrInvalidFilter)
	}
	return at, id, nil
}
