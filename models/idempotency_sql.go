package models

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
)

// The two statements every keyed request runs, the claim's INSERT and the
// completion's UPDATE, bypass GORM: through it (its callback chain,
// reflection and statement building) each cost about a sixth of the
// proxy's CPU on the keyed path (issue 15). On PostgreSQL they run on pgx
// under database/sql's pool (writtenRows); pgx prepares the claim once per
// connection and caches it (its default statement cache), and plans the
// completion afresh each time (completeBatch says why). On SQLite they go
// to database/sql, whose driver prepares every statement anyway.
//
// The lease clock is the database's on PostgreSQL and the store's on
// SQLite, as in sqlNow.

const (
	// On PostgreSQL both go through batchers (group commit): the claims
	// and completions of concurrent requests share one statement, one
	// round trip and one commit. Each call's row is its own: a claim won
	// is one whose key and owner come back (two claims of one key in a
	// batch: the first inserts, the second conflicts), a completion done is
	// one whose owner still held the lease.
	claimInsertPostgres = `INSERT INTO idempotency_records (id, client, method, path, idem_key, fingerprint, state, owner, ` +
		`headers, stream, replayable, attempts, locked_until, created_at, updated_at, expires_at) ` +
		`SELECT c.id, c.client, c.method, c.path, c.idem_key, c.fingerprint, $11, c.owner, '{}', c.stream, true, 1, ` +
		`now() + c.lease * interval '1 microsecond', now(), now(), now() + c.ttl * interval '1 microsecond' ` +
		`FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bool[], $9::bigint[], $10::bigint[]) ` +
		`AS c(id, client, method, path, idem_key, fingerprint, owner, stream, lease, ttl) ` +
		`ON CONFLICT DO NOTHING RETURNING id, owner`
	claimInsertSQLite = `INSERT INTO idempotency_records (id, client, method, path, idem_key, fingerprint, state, owner, ` +
		`headers, stream, replayable, attempts, locked_until, created_at, updated_at, expires_at) ` +
		`VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?) ON CONFLICT DO NOTHING`

	completePostgres = `UPDATE idempotency_records r SET state = $10, owner = '', status = v.status, headers = v.headers, body = v.body, ` +
		`body_size = v.body_size, stream = v.stream, replayable = v.replayable, release_reason = '', ` +
		`updated_at = now(), expires_at = now() + v.ttl * interval '1 microsecond' ` +
		`FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::bytea[], $6::bigint[], $7::bool[], $8::bool[], $9::bigint[]) ` +
		`AS v(id, owner, status, headers, body, body_size, stream, replayable, ttl) ` +
		`WHERE r.id = v.id AND r.owner = v.owner AND r.state = $11 RETURNING v.id, v.owner`
	completeSQLite = `UPDATE idempotency_records SET state = ?, owner = '', status = ?, headers = ?, body = ?, ` +
		`body_size = ?, stream = ?, replayable = ?, release_reason = '', ` +
		`updated_at = ?, expires_at = ? WHERE id = ? AND owner = ? AND state = ?`
)

// Batching on PostgreSQL: workers per kind of statement (each holds one
// pooled connection while it runs), how long a batch waits for another
// worker's statement to end before it runs beside it, calls per batch, and
// the completions' body bytes after which a batch takes no more. Fewer
// statements at once make larger batches: on the 2-core test box at 64
// connections one worker averaged 15 calls a batch, two running at once
// 8.5, four 4.7, and the proxy's CPU per keyed request rose with the count
// (issue 15). Two that take turns (batcher) batch as one does; the second
// runs beside a statement kept waiting longer than batchPatience (on a row
// lock, say), so that one does not hold up every keyed request.
const (
	batchWorkers  = 2
	batchPatience = 20 * time.Millisecond
	batchMax      = 64
	batchMaxBody  = 1 << 20
	batchTimeout  = 5 * time.Second
)

// completion is one CompleteIdempotency call, as the batcher carries it.
type completion struct {
	id, owner string
	Completion
	ttl time.Duration
}

// startBatchers starts the claim and completion batchers of a PostgreSQL
// store.
func (s *Store) startBatchers(db *sql.DB) {
	s.claims = (&batcher[ClaimRequest, bool]{max: batchMax, timeout: batchTimeout, patience: batchPatience,
		run: func(ctx context.Context, rs []ClaimRequest) ([]bool, error) { return claimBatch(ctx, db, rs) },
	}).start(batchWorkers)
	s.completions = (&batcher[completion, bool]{max: batchMax, timeout: batchTimeout, patience: batchPatience,
		size: func(c completion) int { return len(c.Body) }, maxSize: batchMaxBody,
		run: func(ctx context.Context, cs []completion) ([]bool, error) { return completeBatch(ctx, db, cs) },
	}).start(batchWorkers)
}

// IdempotencyBatches reports what the batcher of kind ("claim" or
// "completion") did; zero on SQLite, which does not batch.
func (s *Store) IdempotencyBatches(kind string) BatchCounts {
	switch {
	case s.claims == nil:
		return BatchCounts{}
	case kind == "claim":
		return s.claims.counts()
	}
	return s.completions.counts()
}

// heldBy names a key id held by an owner: one call of a batch.
type heldBy struct{ id, owner string }

// inKeyOrder orders a batch's rows by key id, so two batches that share
// keys lock their rows in the same order and never deadlock.
func inKeyOrder(calls []heldBy) []int {
	order := make([]int, len(calls))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int { return strings.Compare(calls[a].id, calls[b].id) })
	return order
}

// writtenRows runs a batch statement that returns the key id and owner of
// each row it wrote, and reports for each call whether its row was. It
// runs on pgx itself (onPgx): database/sql's row scanning cost more
// allocations than the statement (issue 15). The returned values are
// read in pgx's buffer (pgtype.DriverBytes) and matched against the calls
// there, as a batch holds at most batchMax of them.
func writtenRows(ctx context.Context, db *sql.DB, calls []heldBy, query string, args ...any) ([]bool, error) {
	written := make([]bool, len(calls))
	err := onPgx(ctx, db, func(conn *pgx.Conn) error {
		rows, err := conn.Query(ctx, query, args...)
		if err != nil {
			return err
		}
		var id, owner pgtype.DriverBytes
		_, err = pgx.ForEachRow(rows, []any{&id, &owner}, func() error {
			for i, c := range calls {
				if c.id == string(id) && c.owner == string(owner) {
					written[i] = true
				}
			}
			return nil
		})
		return err
	})
	if err != nil {
		return nil, err
	}
	return written, nil
}

func claimBatch(ctx context.Context, db *sql.DB, rs []ClaimRequest) ([]bool, error) {
	n := len(rs)
	calls := make([]heldBy, n)
	for i, r := range rs {
		calls[i] = heldBy{r.ID, r.Owner}
	}
	text, ints, streams := columns[pgText](7, n), columns[pgInt8](2, n), make(column[pgBool], n)
	ids, clients, methods, paths, keys, prints, owners := text[0], text[1], text[2], text[3], text[4], text[5], text[6]
	leases, ttls := ints[0], ints[1]
	for j, i := range inKeyOrder(calls) {
		r := rs[i]
		ids[j], clients[j], methods[j], paths[j] = pgText(r.ID), pgText(r.Client), pgText(r.Method), pgText(r.Path)
		keys[j], prints[j], owners[j] = pgText(r.Key), pgText(r.Fingerprint), pgText(r.Owner)
		streams[j], leases[j], ttls[j] = pgBool(r.Stream), pgInt8(r.Lease.Microseconds()), pgInt8(r.TTL.Microseconds())
	}
	return writtenRows(ctx, db, calls, claimInsertPostgres,
		ids, clients, methods, paths, keys, prints, owners, streams, leases, ttls, StateInProgress)
}

func completeBatch(ctx context.Context, db *sql.DB, cs []completion) ([]bool, error) {
	n := len(cs)
	calls := make([]heldBy, n)
	for i, c := range cs {
		calls[i] = heldBy{c.id, c.owner}
	}
	text, ints, flags, bodies := columns[pgText](3, n), columns[pgInt8](3, n), columns[pgBool](2, n), make(column[pgBytea], n)
	ids, owners, headers := text[0], text[1], text[2]
	statuses, sizes, ttls := ints[0], ints[1], ints[2]
	streams, replayables := flags[0], flags[1]
	for j, i := range inKeyOrder(calls) {
		c := cs[i]
		ids[j], owners[j], headers[j] = pgText(c.id), pgText(c.owner), pgText(c.Headers)
		statuses[j], bodies[j], sizes[j] = pgInt8(c.Status), c.Body, pgInt8(c.BodySize)
		streams[j], replayables[j], ttls[j] = pgBool(c.Stream), pgBool(c.Replayable), pgInt8(c.ttl.Microseconds())
	}
	// Planned afresh on every run (pgx's cache-describe mode: one round
	// trip, no cached plan). A plan cached while the table was nearly empty
	// is a hash join over a sequential scan, kept as the table grows until
	// an ANALYZE happens to replace it: every batch read the whole table.
	return writtenRows(ctx, db, calls, completePostgres, pgx.QueryExecModeCacheDescribe,
		ids, owners, statuses, headers, bodies, sizes, streams, replayables, ttls, StateCompleted, StateInProgress)
}

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
	if s.claims != nil {
		return s.claims.do(ctx, r)
	}
	db, err := s.sqlDB()
	if err != nil {
		return false, err
	}
	now := s.now()
	res, err := db.ExecContext(ctx, claimInsertSQLite,
		r.ID, r.Client, r.Method, r.Path, r.Key, r.Fingerprint, StateInProgress, r.Owner, "{}", r.Stream, true,
		now.Add(r.Lease), now, now, now.Add(r.TTL))
	if err != nil {
		return false, err
	}
	n, err := res.RowsAffected()
	return n == 1, err
}

// updateCompletion runs the completion's UPDATE, conditional on the lease
// still being this attempt's, and returns the rows it changed.
func (s *Store) updateCompletion(ctx context.Context, id, owner string, c Completion, ttl time.Duration) (int64, error) {
	if s.completions != nil {
		done, err := s.completions.do(ctx, completion{id: id, owner: owner, Completion: c, ttl: ttl})
		if done {
			return 1, err
		}
		return 0, err
	}
	db, err := s.sqlDB()
	if err != nil {
		return 0, err
	}
	now := s.now()
	res, err := db.ExecContext(ctx, completeSQLite,
		StateCompleted, c.Status, c.Headers, c.Body, c.BodySize, c.Stream, c.Replayable,
		now, now.Add(ttl), id, owner, StateInProgress)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}
