package models

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"time"

	"gorm.io/gorm"
	"gorm.io/gorm/clause"

	"github.com/openai-idempotent-proxy/proxy/migrations"
)

// States of an idempotency record.
const (
	StateInProgress = "in_progress" // an attempt holds the lease and is running upstream
	StateCompleted  = "completed"   // the response is stored (or known too large to store)
	StateReleased   = "released"    // the attempt failed retryably; the next request executes
)

// ErrLeaseLost means another attempt took the key over: this attempt must
// not write its result.
var ErrLeaseLost = errors.New("models: idempotency lease lost")

// IdempotencyRecord is one row of idempotency_records.
type IdempotencyRecord struct {
	ID            string // hex SHA-256 of client and key (method and path are in Fingerprint)
	Client        string
	Method        string
	Path          string
	IdemKey       string
	Fingerprint   string
	State         string
	Owner         string
	LockedUntil   time.Time
	Status        int
	Headers       string // JSON object of replayed response headers
	Body          []byte
	BodySize      int64
	Stream        bool
	Replayable    bool
	ReplayCount   int
	JoinCount     int // repeats that joined a running attempt
	LastReplayAt  *time.Time
	Attempts      int
	ReleaseReason string
	CreatedAt     time.Time
	UpdatedAt     time.Time
	ExpiresAt     time.Time
}

// ClaimRequest asks to run a keyed request.
type ClaimRequest struct {
	ID, Client, Method, Path, Key, Fingerprint string
	Owner                                      string // random token of this attempt
	Stream                                     bool
	Lease, TTL                                 time.Duration
}

// ClaimIdempotency tries to take the key for this attempt. It returns
// claimed=true when this attempt may execute; otherwise the existing record,
// which the caller judges (replay, 409 in progress, 422 mismatch). When
// claimed is true, existing is non-nil only if this attempt took the key
// over from a holder whose lease had lapsed.
//
// The claim is one arbitrated statement, never check-then-insert: an INSERT
// … ON CONFLICT DO NOTHING on the primary key, then, if the row exists, a
// conditional UPDATE that takes it over only when it is free (expired, or
// released by a failed attempt with the same fingerprint) or in progress
// under a lapsed lease (its holder crashed). A live lease always wins, even
// over an expired TTL: the TTL counts from the end of an attempt. Both
// conditions are evaluated by the database on the database's clock (see
// sqlNow), and RowsAffected decides the single winner on PostgreSQL and
// SQLite alike.
func (s *Store) ClaimIdempotency(ctx context.Context, r ClaimRequest) (claimed bool, existing *IdempotencyRecord, err error) {
	for range 3 {
		inserted, insertErr := s.insertClaim(ctx, r)
		if insertErr != nil {
			return false, nil, fmt.Errorf("models: claim idempotency key: %w", insertErr)
		}
		if inserted {
			return true, nil, nil
		}
		free, lapsed := s.claimConditions(r.Fingerprint)
		// The row exists: read it with the database's judgement of it, and
		// only where it may be taken over try the conditional UPDATE (which
		// alone decides the winner). A replay or a 409 so costs two
		// statements.
		var row struct {
			IdempotencyRecord `gorm:"embedded"`
			Free, Lapsed      bool
		}
		err := s.db.WithContext(ctx).Model(&IdempotencyRecord{}).
			Select(recordColumnsSQL+", ("+free.SQL+") AS free, ("+lapsed.SQL+") AS lapsed", append(append([]any{}, free.Vars...), lapsed.Vars...)...).
			Where("id = ?", r.ID).Take(&row).Error
		if errors.Is(err, gorm.ErrRecordNotFound) {
			continue // swept or deleted between the statements: claim again
		}
		if err != nil {
			return false, nil, fmt.Errorf("models: load idempotency key: %w", err)
		}
		switch {
		case row.Free:
			taken, err := s.takeOver(ctx, r, free)
			if err != nil || taken {
				return taken, nil, err
			}
		case row.Lapsed:
			taken, err := s.takeOver(ctx, r, lapsed)
			if err != nil || taken {
				return taken, &IdempotencyRecord{ID: r.ID, State: StateInProgress}, err
			}
		default:
			rec := row.IdempotencyRecord
			return false, &rec, nil
		}
		// Another attempt won the takeover: read the row again.
	}
	return false, nil, errors.New("models: claim idempotency key: row keeps changing")
}

// claimConditions are the two ways a claim may take over an existing row,
// as SQL on the lease clock: free (expired and not held by a live lease, or
// released after a failed attempt of the same request), and lapsed (in
// progress for the same request, but its holder stopped renewing).
func (s *Store) claimConditions(fingerprint string) (free, lapsed clause.Expr) {
	now := s.sqlNow(0)
	free = gorm.Expr("(expires_at < ? AND NOT (state = ? AND locked_until >= ?)) OR (fingerprint = ? AND state = ?)",
		now, StateInProgress, now, fingerprint, StateReleased)
	lapsed = gorm.Expr("fingerprint = ? AND state = ? AND locked_until < ?", fingerprint, StateInProgress, now)
	return free, lapsed
}

// takeOver moves an existing row to this attempt when cond holds.
func (s *Store) takeOver(ctx context.Context, r ClaimRequest, cond clause.Expr) (bool, error) {
	now := s.sqlNow(0)
	res := s.db.WithContext(ctx).Model(&IdempotencyRecord{}).
		Where("id = ?", r.ID).Where(cond).
		Updates(map[string]any{
			"fingerprint": r.Fingerprint, "state": StateInProgress, "owner": r.Owner,
			"locked_until": s.sqlNow(r.Lease), "status": 0, "headers": "{}", "body": nil,
			"body_size": 0, "stream": r.Stream, "replayable": true,
			"attempts": gorm.Expr("attempts + 1"), "updated_at": now,
			// An expired key is new again; a retried one keeps its window.
			"expires_at": gorm.Expr("CASE WHEN expires_at < ? THEN ? ELSE expires_at END", now, s.sqlNow(r.TTL)),
			"created_at": gorm.Expr("CASE WHEN expires_at < ? THEN ? ELSE created_at END", now, now),
		})
	if res.Error != nil {
		return false, fmt.Errorf("models: take over idempotency key: %w", res.Error)
	}
	return res.RowsAffected == 1, nil
}

// sqlNow is the lease clock plus d, as SQL. On PostgreSQL it is the
// database's clock: replicas compare leases and expiries written by each
// other, and their own clocks may disagree by more than a lease, which
// would let a live lease be taken over. SQLite serves one host, whose
// clock (the store's, injectable in tests) is bound as a value.
func (s *Store) sqlNow(d time.Duration) clause.Expr {
	if s.isPostgres() {
		if d == 0 {
			return gorm.Expr("now()")
		}
		return gorm.Expr("now() + ?::bigint * interval '1 microsecond'", d.Microseconds())
	}
	return gorm.Expr("?", s.now().Add(d))
}

// RenewIdempotencyLease extends the lease of a running attempt.
func (s *Store) RenewIdempotencyLease(ctx context.Context, id, owner string, lease time.Duration) error {
	res := s.db.WithContext(ctx).Model(&IdempotencyRecord{}).
		Where("id = ? AND owner = ? AND state = ?", id, owner, StateInProgress).
		Updates(map[string]any{"locked_until": s.sqlNow(lease), "updated_at": s.sqlNow(0)})
	return leaseResult(res, "renew idempotency lease")
}

// Completion is the result an attempt stores.
type Completion struct {
	Status     int
	Headers    string
	Body       []byte
	BodySize   int64
	Stream     bool
	Replayable bool // false: executed, but too large to store
}

// CompleteIdempotency stores the attempt's response. The TTL runs from now.
func (s *Store) CompleteIdempotency(ctx context.Context, id, owner string, c Completion, ttl time.Duration) error {
	n, err := s.updateCompletion(ctx, id, owner, c, ttl)
	if err != nil {
		return fmt.Errorf("models: complete idempotency key: %w", err)
	}
	if n != 1 {
		return ErrLeaseLost
	}
	return nil
}

// ReleaseIdempotency gives the key back after a retryable failure, so the
// next request with it executes; the reason is kept for the dashboard. The
// TTL runs from now, as after a completion: until it ends, another request
// with the key is a reuse (422).
func (s *Store) ReleaseIdempotency(ctx context.Context, id, owner, reason string, ttl time.Duration) error {
	res := s.db.WithContext(ctx).Model(&IdempotencyRecord{}).
		Where("id = ? AND owner = ? AND state = ?", id, owner, StateInProgress).
		Updates(map[string]any{"state": StateReleased, "owner": "", "release_reason": reason, "body": nil,
			"updated_at": s.sqlNow(0), "expires_at": s.sqlNow(ttl)})
	return leaseResult(res, "release idempotency key")
}

func leaseResult(res *gorm.DB, what string) error {
	if res.Error != nil {
		return fmt.Errorf("models: %s: %w", what, res.Error)
	}
	if res.RowsAffected != 1 {
		return ErrLeaseLost
	}
	return nil
}

// MarkIdempotencyReplayed counts one replay of a stored response.
func (s *Store) MarkIdempotencyReplayed(ctx context.Context, id string) error {
	err := s.db.WithContext(ctx).Model(&IdempotencyRecord{}).Where("id = ?", id).
		Updates(map[string]any{"replay_count": gorm.Expr("replay_count + 1"), "last_replay_at": s.sqlNow(0)}).Error
	if err != nil {
		return fmt.Errorf("models: count idempotency replay: %w", err)
	}
	return nil
}

// SweepIdempotency deletes expired records in batches of at most batch rows,
// leaving alone attempts still running under a live lease.
func (s *Store) SweepIdempotency(ctx context.Context, batch int) (int64, error) {
	return inBatches(batch, func(limit int) (int64, error) {
		now := s.sqlNow(0) // the lease clock: now() on PostgreSQL, a bound time on SQLite
		query := "DELETE FROM idempotency_records WHERE id IN (SELECT id FROM idempotency_records" +
			" WHERE expires_at < " + now.SQL + " AND NOT (state = ? AND locked_until > " + now.SQL + ") LIMIT ?)"
		args := slices.Concat(now.Vars, []any{StateInProgress}, now.Vars, []any{limit})
		n, err := s.execSweep(ctx, query, args...)
		if err != nil {
			return n, fmt.Errorf("models: sweep idempotency keys: %w", err)
		}
		return n, nil
	})
}

// DeleteIdempotency expires a key now: the next request with it executes.
func (s *Store) DeleteIdempotency(ctx context.Context, id string) error {
	res := s.db.WithContext(ctx).Where("id = ?", id).Delete(&IdempotencyRecord{})
	if res.Error != nil {
		return fmt.Errorf("models: delete idempotency key: %w", res.Error)
	}
	if res.RowsAffected == 0 {
		return ErrNotFound
	}
	return nil
}

// recordColumnsSQL selects every column of a record but its body: a
// claim that finds a record reads the body only to replay it, and then in
// chunks (IdempotencyBodyChunk), so a retry storm on a large record does
// not load it once per retry.
const recordColumnsSQL = "id, client, method, path, idem_key, fingerprint, state, owner, locked_until, status, headers, " +
	"body_size, stream, replayable, replay_count, join_count, last_replay_at, attempts, release_reason, created_at, updated_at, expires_at"

// IdempotencyBodyChunk reads n bytes of a completed record's body from
// offset off. attempt is the record's Attempts as the replay found it: a
// record that expired and was run again meanwhile has another, so it is
// never mixed into a replay; then, or if the record is gone, it returns
// ErrNotFound.
func (s *Store) IdempotencyBodyChunk(ctx context.Context, id string, attempt int, off, n int64) ([]byte, error) {
	expr := "substr(body, ?, ?)" // SQLite: blobs, 1-based
	if s.dialect == migrations.Postgres {
		expr = "substring(body from ?::int for ?::int)"
	}
	var chunk []byte
	err := s.db.WithContext(ctx).Model(&IdempotencyRecord{}).Select(expr, off+1, n).
		Where("id = ? AND attempts = ? AND state = ?", id, attempt, StateCompleted).Row().Scan(&chunk)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("models: read idempotency body: %w", err)
	}
	return chunk, nil
}

// IdempotencyByID loads one record, body included.
func (s *Store) IdempotencyByID(ctx context.Context, id string) (IdempotencyRecord, error) {
	var rec IdempotencyRecord
	err := s.db.WithContext(ctx).Where("id = ?", id).Take(&rec).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return rec, ErrNotFound
	}
	if err != nil {
		return rec, fmt.Errorf("models: load idempotency key: %w", err)
	}
	utcRecord(&rec)
	return rec, nil
}
