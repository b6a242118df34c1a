package models

import (
	"context"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// inBatches runs one bounded delete (at most batch rows) until it deletes
// fewer than batch rows, so a large backlog never holds one long lock, and
// returns how many rows went.
func inBatches(batch int, deleteOnce func(batch int) (int64, error)) (int64, error) {
	var total int64
	for {
		n, err := deleteOnce(batch)
		total += n
		if err != nil || n < int64(batch) {
			return total, err
		}
	}
}

// execSweep runs one statement of a batched sweep and returns the rows it
// affected. On PostgreSQL it is planned afresh on every run (pgx's
// cache-describe mode, as the completion batch is): a sweep's DELETE … IN
// (SELECT … LIMIT ?) cached as a generic plan while its table was small is
// a hash join over a sequential scan of the whole table, kept as the table
// grows until an ANALYZE replaces it, and run once per batch.
func (s *Store) execSweep(ctx context.Context, query string, args ...any) (int64, error) {
	if !s.isPostgres() {
		res := s.db.WithContext(ctx).Exec(query, args...)
		return res.RowsAffected, res.Error
	}
	db, err := s.sqlDB()
	if err != nil {
		return 0, err
	}
	var n int64
	err = onPgx(ctx, db, func(conn *pgx.Conn) error {
		tag, err := conn.Exec(ctx, dollarPlaceholders(query), append([]any{pgx.QueryExecModeCacheDescribe}, args...)...)
		n = tag.RowsAffected()
		return err
	})
	return n, err
}

// A keyset cursor is a row's position in a newest-first list:
// "<unix nanoseconds of created_at>.<id>".

func encodeCursor(at time.Time, id string) string {
	return strconv.FormatInt(at.UnixNano(), 10) + "." + id
}

// decodeCursor reads a cursor whose id passes validID.
func decodeCursor(c string, validID func(string) bool) (time.Time, string, bool) {
	ns, id, ok := strings.Cut(c, ".")
	n, err := strconv.ParseInt(ns, 10, 64)
	if !ok || err != nil || !validID(id) {
		return time.Time{}, "", false
	}
	return time.Unix(0, n).UTC(), id, true
}
