package models

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"gorm.io/gorm"
)

// LogFilter selects request logs for the list view. Zero fields match
// everything; string fields match exactly, so each uses its index.
type LogFilter struct {
	StatusClass    int // 2..5 for 2xx..5xx; 0 for any
	Model          string
	Path           string
	Client         string
	IdempotencyKey string
	Outcome        string
	From, To       time.Time // created_at in [From, To); zero leaves that side open
	// Cursor continues a listing: LogPage.Next of the previous page.
	Cursor string
	// Limit is the page size: default 50, at most 200.
	Limit int
}

// LogPage is one page of request logs, newest first.
type LogPage struct {
	Logs []RequestLog
	// Next is the cursor of the following page; empty on the last page.
	Next string
}

const (
	defaultPageSize = 50
	maxPageSize     = 200
)

// ListRequestLogs pages through request logs newest first. It paginates by
// keyset, (created_at, id) below the last row shown, so a page costs the
// same at any depth and rows written meanwhile neither shift nor repeat
// the pages that follow.
func (s *Store) ListRequestLogs(ctx context.Context, f LogFilter) (LogPage, error) {
	limit := f.Limit
	if limit <= 0 {
		limit = defaultPageSize
	}
	limit = min(limit, maxPageSize)
	q, err := s.filterLogs(s.db.WithContext(ctx), f)
	if err != nil {
		return LogPage{}, err
	}
	var logs []RequestLog
	// One row more than the page tells whether another page exists.
	if err := q.Order("created_at DESC, id DESC").Limit(limit + 1).Find(&logs).Error; err != nil {
		return LogPage{}, fmt.Errorf("models: list request logs: %w", err)
	}
	for i := range logs {
		logs[i].CreatedAt = logs[i].CreatedAt.UTC()
	}
	page := LogPage{Logs: logs}
	if len(logs) > limit {
		page.Logs = logs[:limit]
		last := logs[limit-1]
		page.Next = encodeLogCursor(last.CreatedAt, last.ID)
	}
	return page, nil
}

// filterLogs adds f's conditions. Each predicate is written exactly as its
// index in 00002_request_logs.sql is defined, so the planner can use it.
func (s *Store) filterLogs(q *gorm.DB, f LogFilter) (*gorm.DB, error) {
	if f.StatusClass != 0 {
		if f.StatusClass < 2 || f.StatusClass > 5 {
			return nil, fmt.Errorf("models: status class %d: %w", f.StatusClass, ErrInvalidFilter)
		}
		q = q.Where("status / 100 = ?", f.StatusClass)
	}
	for _, eq := range [...]struct{ col, val string }{
		{"model", f.Model}, {"path", f.Path}, {"client", f.Client}, {"outcome", f.Outcome},
	} {
		if eq.val != "" {
			q = q.Where(eq.col+" = ?", eq.val)
		}
	}
	if f.IdempotencyKey != "" {
		// Repeats the partial index's predicate: with a bound parameter the
		// planner cannot prove key <> '' by itself.
		q = q.Where("idempotency_key = ? AND idempotency_key <> ''", f.IdempotencyKey)
	}
	if !f.From.IsZero() {
		q = q.Where("created_at >= ?", f.From.UTC())
	}
	if !f.To.IsZero() {
		q = q.Where("created_at < ?", f.To.UTC())
	}
	if f.Cursor != "" {
		at, id, err := decodeLogCursor(f.Cursor)
		if err != nil {
			return nil, err
		}
		// A row-value comparison is one index range on (created_at, id).
		q = q.Where("(created_at, id) < (?, ?)", at, id)
	}
	return q, nil
}

// encodeLogCursor writes the position of a request log row.
func encodeLogCursor(at time.Time, id int64) string {
	return encodeCursor(at, strconv.FormatInt(id, 10))
}

func decodeLogCursor(c string) (time.Time, int64, error) {
	var n int64
	at, _, ok := decodeCursor(c, func(id string) bool {
		var err error
		n, err = strconv.ParseInt(id, 10, 64)
		return err == nil
	})
	if !ok {
		return time.Time{}, 0, fmt.Errorf("models: cursor %q: %w", c, ErrInvalidFilter)
	}
	return at, n, nil
}

// RequestLogByID returns one request log, or ErrNotFound.
func (s *Store) RequestLogByID(ctx context.Context, id int64) (RequestLog, error) {
	var r RequestLog
	err := s.db.WithContext(ctx).Where("id = ?", id).Take(&r).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return RequestLog{}, fmt.Errorf("models: request log %d: %w", id, ErrNotFound)
	}
	if err != nil {
		return RequestLog{}, fmt.Errorf("models: request log %d: %w", id, err)
	}
	r.CreatedAt = r.CreatedAt.UTC()
	return r, nil
}

// SweepRequestLogs deletes request logs created before before, batchSize
// rows per statement so no single delete holds locks or bloats the WAL for
// long, until none are left. It returns how many it deleted; the app runs it
// periodically. Roll-ups have their own retention: SweepRollups.
func (s *Store) SweepRequestLogs(ctx context.Context, before time.Time, batchSize int) (int64, error) {
	n, err := s.deleteInBatches(ctx,
		"DELETE FROM request_logs WHERE id IN (SELECT id FROM request_logs WHERE created_at < ? LIMIT ?)",
		before.UTC(), batchSize)
	if err != nil {
		return n, fmt.Errorf("models: sweep request logs: %w", err)
	}
	return n, nil
}

// SweepRollups deletes roll-up rows whose whole bucket lies before before.
// Roll-ups are small, so they are usually kept longer than the raw log.
func (s *Store) SweepRollups(ctx context.Context, before time.Time, batchSize int) (int64, error) {
	var total int64
	for _, scope := range [...]int{scopeTotal, scopeClientModel} {
		for _, span := range rollupSpans {
			// scope and span are our constants; as literals they let each
			// statement be one range of the primary key.
			n, err := s.deleteInBatches(ctx,
				fmt.Sprintf("DELETE FROM request_rollups WHERE (scope, span, bucket, client, model, status_class) IN"+
					" (SELECT scope, span, bucket, client, model, status_class FROM request_rollups"+
					" WHERE scope = %d AND span = %d AND bucket < ? LIMIT ?)", scope, span),
				before.Unix()-span+1, batchSize)
			total += n
			if err != nil {
				return total, fmt.Errorf("models: sweep roll-ups: %w", err)
			}
		}
	}
	return total, nil
}

// deleteInBatches runs a DELETE taking (cutoff, limit) until it deletes
// fewer than batchSize rows.
func (s *Store) deleteInBatches(ctx context.Context, sql string, cutoff any, batchSize int) (int64, error) {
	if batchSize <= 0 {
		batchSize = 1000
	}
	return inBatches(batchSize, func(limit int) (int64, error) { return s.execSweep(ctx, sql, cutoff, limit) })
}
