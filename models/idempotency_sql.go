package models

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// The two statements every keyed request runs, the claim's INSERT and the
// completion's UPDATE, go straight to database/sql: through GORM (its
// callback chain, reflection and statement building) each cost about a
// sixth of the proxy's CPU on the keyed path (issue 15). They are the same
// statements GORM built, with the same values. On PostgreSQL pgx prepares
// each once per connection and caches it (its default statement cache); on
// SQLite the driver prepares every statement anyway.
//
// The lease clock is the database's on PostgreSQL and the store's on
// SQLite, as in sqlNow.

const (
	claimInsertPostgres = `INSERT INTO idempotency_records (id, client, method, path, idem_key, fingerprint, state, owner, ` +
		`headers, stream, replayable, attempts, locked_until, created_at, updated_at, expires_at) ` +
		`VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 1, ` +
		`now() + $12::bigint * interval '1 microsecond', now(), now(), now() + $13::bigint * interval '1 microsecond') ` +
		`ON CONFLICT DO NOTHING`
	claimInsertSQLite = `INSERT INTO idempotency_records (id, client, method, path, idem_key, fingerprint, state, owner, ` +
		`headers, stream, replayable, attempts, locked_until, created_at, updated_at, expires_at) ` +
		`VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?) ON CONFLICT DO NOTHING`

	completePostgres = `UPDATE idempotency_records SET state = $1, owner = '', status = $2, headers = $3, body = $4, ` +
		`body_size = $5, stream = $6, replayable = $7, release_reason = '', ` +
		`updated_at = now(), expires_at = now() + $8::bigint * interval '1 microsecond' ` +
		`WHERE id = $9 AND owner = $10 AND state = $11`
	completeSQLite = `UPDATE idempotency_records SET state = ?, owner = '', status = ?, headers = ?, body = ?, ` +
		`body_size = ?, stream = ?, replayable = ?, release_reason = '', ` +
		`updated_at = ?, expires_at = ? WHERE id = ? AND owner = ? AND state = ?`
)

// sqlDB is the pool under GORM.
func (s *Store) sqlDB() (*sql.DB, error) {
	db, err := s.db.DB()
	if err != nil {
		return nil, fmt.Errorf("models: %w", err)
	}
	return db, nil
}

// insertClaim runs the claim's INSERT … ON CONFLICT DO NOTHING and reports
// whether it inserted the row.
func (s *Store) insertClaim(ctx context.Context, r ClaimRequest) (bool, error) {
	db, err := s.sqlDB()
	if err != nil {
		return false, err
	}
	var res sql.Result
	if s.isPostgres() {
		res, err = db.ExecContext(ctx, claimInsertPostgres,
			r.ID, r.Client, r.Method, r.Path, r.Key, r.Fingerprint, StateInProgress, r.Owner, "{}", r.Stream, true,
			r.Lease.Microseconds(), r.TTL.Microseconds())
	} else {
		now := s.now()
		res, err = db.ExecContext(ctx, claimInsertSQLite,
			r.ID, r.Client, r.Method, r.Path, r.Key, r.Fingerprint, StateInProgress, r.Owner, "{}", r.Stream, true,
			now.Add(r.Lease), now, now, now.Add(r.TTL))
	}
	if err != nil {
		return false, err
	}
	n, err := res.RowsAffected()
	return n == 1, err
}

// updateCompletion runs the completion's UPDATE, conditional on the lease
// still being this attempt's, and returns the rows it changed.
func (s *Store) updateCompletion(ctx context.Context, id, owner string, c Completion, ttl time.Duration) (int64, error) {
	db, err := s.sqlDB()
	if err != nil {
		return 0, err
	}
	var res sql.Result
	if s.isPostgres() {
		res, err = db.ExecContext(ctx, completePostgres,
			StateCompleted, c.Status, c.Headers, c.Body, c.BodySize, c.Stream, c.Replayable,
			ttl.Microseconds(), id, owner, StateInProgress)
	} else {
		now := s.now()
		res, err = db.ExecContext(ctx, completeSQLite,
			StateCompleted, c.Status, c.Headers, c.Body, c.BodySize, c.Stream, c.Replayable,
			now, now.Add(ttl), id, owner, StateInProgress)
	}
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}
