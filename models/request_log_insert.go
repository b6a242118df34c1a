package models

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

// The request-log writer's batches bypass GORM: its reflective multi-row
// Create cost about a tenth of the proxy's CPU under load (issue 15). On
// PostgreSQL a batch goes in with the COPY protocol, on SQLite through one
// prepared statement; the roll-ups are the same upsert as before, in the
// same transaction.

// requestLogColumns are the columns a batch writes, in the order of
// appendRequestLogValues and requestLogPointers: every column of
// RequestLog but the generated id.
var requestLogColumns = []string{
	"created_at", "client", "method", "path", "model", "stream", "status", "outcome",
	"duration_ms", "ttfb_ms", "request_bytes", "response_bytes",
	"prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens", "cost_micros",
	"upstream_request_id", "idempotency_key", "error", "client_ip", "user_agent",
}

// appendRequestLogValues appends r's values in requestLogColumns order,
// for database/sql (SQLite).
func appendRequestLogValues(dst []any, r *RequestLog) []any {
	return append(dst,
		r.CreatedAt, r.Client, r.Method, r.Path, r.Model, r.Stream, r.Status, r.Outcome,
		r.DurationMs, r.TTFBMs, r.RequestBytes, r.ResponseBytes,
		r.PromptTokens, r.CompletionTokens, r.TotalTokens, r.CachedTokens, r.ReasoningTokens, r.CostMicros,
		r.UpstreamRequestID, r.IdempotencyKey, r.Error, r.ClientIP, r.UserAgent)
}

// copyRequestLogsSQL is the COPY a batch goes in with, in PostgreSQL's
// text format (appendCopyRow writes it).
var copyRequestLogsSQL = "COPY request_logs (" + strings.Join(requestLogColumns, ", ") + ") FROM STDIN"

// appendCopyRow appends r as one line of COPY's text format, its values
// in requestLogColumns order. The rows go to pgconn's COPY as they are:
// pgx's CopyFrom plans the encoding of every value (its type map looked up
// by the value's reflect.Type), about 9,000 instructions per row, the
// largest cost of an unkeyed request in the proxy's own hands (issue 15).
// Text is PostgreSQL's own input for each type; sanitize has made every
// string valid UTF-8 without NUL, and copyText escapes what COPY reads
// specially. No column is NULL.
func appendCopyRow(b []byte, r *RequestLog) []byte {
	b = appendCopyTime(b, r.CreatedAt)
	for _, s := range [...]string{r.Client, r.Method, r.Path, r.Model} {
		b = copyText(append(b, '\t'), s)
	}
	b = append(b, '\t', 'f')
	if r.Stream {
		b[len(b)-1] = 't'
	}
	b = strconv.AppendInt(append(b, '\t'), int64(r.Status), 10)
	b = copyText(append(b, '\t'), r.Outcome)
	for _, n := range [...]int64{r.DurationMs, r.TTFBMs, r.RequestBytes, r.ResponseBytes,
		r.PromptTokens, r.CompletionTokens, r.TotalTokens, r.CachedTokens, r.ReasoningTokens, r.CostMicros} {
		b = strconv.AppendInt(append(b, '\t'), n, 10)
	}
	for _, s := range [...]string{r.UpstreamRequestID, r.IdempotencyKey, r.Error, r.ClientIP, r.UserAgent} {
		b = copyText(append(b, '\t'), s)
	}
	return append(b, '\n')
}

// appendCopyTime appends t as timestamptz text, "2006-01-02
// 15:04:05.000000+00" in UTC, with a few appends: time.Format's layout
// parsing cost more than the rest of the row.
func appendCopyTime(b []byte, t time.Time) []byte {
	t = t.UTC()
	y, mo, d := t.Date()
	h, mi, s := t.Clock()
	if y < 1 || y > 9999 {
		return t.AppendFormat(b, "2006-01-02 15:04:05.000000-07:00")
	}
	b = appendPadded(b, y, 4)
	for _, f := range [...]struct {
		sep byte
		n   int
	}{{'-', int(mo)}, {'-', d}, {' ', h}, {':', mi}, {':', s}} {
		b = appendPadded(append(b, f.sep), f.n, 2)
	}
	return append(appendPadded(append(b, '.'), t.Nanosecond()/1000, 6), "+00"...)
}

// appendPadded appends n (0 ≤ n < 10^width) in decimal, zero-padded to
// width.
func appendPadded(b []byte, n, width int) []byte {
	b = append(b, make([]byte, width)...)
	for i := len(b) - 1; i >= len(b)-width; i-- {
		b[i] = byte('0' + n%10)
		n /= 10
	}
	return b
}

// copyText appends s as a COPY text value: a backslash, and the tab,
// newline and carriage return that would end the value or the row, are
// escaped; every other byte stands for itself.
func copyText(b []byte, s string) []byte {
	from := 0
	for i := 0; i < len(s); i++ {
		var esc byte
		switch s[i] {
		case '\\':
			esc = '\\'
		case '\t':
			esc = 't'
		case '\n':
			esc = 'n'
		case '\r':
			esc = 'r'
		default:
			continue
		}
		b = append(append(b, s[from:i]...), '\\', esc)
		from = i + 1
	}
	return append(b, s[from:]...)
}

// insertRequestLogs writes a batch and its roll-ups in one transaction, so
// the roll-ups always equal the sums of the raw rows. The batch's IDs are
// left as they are (zero): nothing reads them back.
func (s *Store) insertRequestLogs(ctx context.Context, batch []RequestLog) error {
	rollups := aggregateRollups(batch)
	sqlDB, err := s.db.DB()
	if err == nil {
		if s.isPostgres() {
			err = copyRequestLogs(ctx, sqlDB, batch, rollups)
		} else {
			err = execRequestLogs(ctx, sqlDB, batch, rollups)
		}
	}
	if err != nil {
		return fmt.Errorf("models: write request logs: %w", err)
	}
	return nil
}

// onPgx runs f on pgx's own connection under one of db's pooled
// connections: pgconn's COPY, and pgx's row scanning, which costs fewer
// allocations than database/sql's.
func onPgx(ctx context.Context, db *sql.DB, f func(*pgx.Conn) error) error {
	conn, err := db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	return conn.Raw(func(dc any) error {
		sc, ok := dc.(*stdlib.Conn)
		if !ok {
			return fmt.Errorf("unexpected PostgreSQL driver connection %T", dc)
		}
		return f(sc.Conn())
	})
}

// copyRequestLogs is the PostgreSQL path: COPY into request_logs and the
// roll-up upserts in one pgx transaction on a pooled connection. If ctx
// ends mid-way pgx closes that connection, and the pool discards it
// (stdlib.Conn reports it bad), so no half-done transaction is reused.
func copyRequestLogs(ctx context.Context, db *sql.DB, batch []RequestLog, rollups []rollupRow) error {
	return onPgx(ctx, db, func(conn *pgx.Conn) error {
		return pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			rows := make([]byte, 0, 256*len(batch)) // a typical row's size
			for i := range batch {
				rows = appendCopyRow(rows, &batch[i])
			}
			tag, err := tx.Conn().PgConn().CopyFrom(ctx, bytes.NewReader(rows), copyRequestLogsSQL)
			if err != nil {
				return err
			}
			if n := tag.RowsAffected(); n != int64(len(batch)) {
				return fmt.Errorf("copied %d of %d rows", n, len(batch))
			}
			for chunk := range slices.Chunk(rollups, rowsPerStatement) {
				q, args := rollupUpsertSQL(chunk)
				if _, err := tx.Exec(ctx, dollarPlaceholders(q), args...); err != nil {
					return err
				}
			}
			return nil
		})
	})
}

// sqliteRowsPerInsert is the rows of one SQLite INSERT (log rows and
// roll-up upserts alike). The driver finds each bound parameter by a
// linear search of all of them, so the cost per row grows with the rows
// per statement, and it prepares the statement again on every execution,
// a cost per statement: a few rows per statement is the least of both
// (BenchmarkLogWriter: 1 row or 32 cost more CPU per record than 16).
const sqliteRowsPerInsert = 16

// execRequestLogs is the SQLite path: one prepared multi-row INSERT run
// for every sqliteRowsPerInsert rows, one for the rest, and the roll-up
// upserts, in one transaction.
func execRequestLogs(ctx context.Context, db *sql.DB, batch []RequestLog, rollups []rollupRow) (err error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, ignoreDone(tx.Rollback()))
		}
	}()
	args := make([]any, 0, sqliteRowsPerInsert*len(requestLogColumns))
	var full *sql.Stmt
	for chunk := range slices.Chunk(batch, sqliteRowsPerInsert) {
		args = args[:0]
		for i := range chunk {
			args = appendRequestLogValues(args, &chunk[i])
		}
		if len(chunk) < sqliteRowsPerInsert {
			if _, err := tx.ExecContext(ctx, requestLogInsertSQL(len(chunk)), args...); err != nil {
				return err
			}
			continue
		}
		if full == nil {
			if full, err = tx.PrepareContext(ctx, requestLogInsertSQL(sqliteRowsPerInsert)); err != nil {
				return err
			}
			defer full.Close()
		}
		if _, err := full.ExecContext(ctx, args...); err != nil {
			return err
		}
	}
	for chunk := range slices.Chunk(rollups, sqliteRowsPerInsert) {
		q, args := rollupUpsertSQL(chunk)
		if _, err := tx.ExecContext(ctx, q, args...); err != nil {
			return err
		}
	}
	return tx.Commit()
}

// ignoreDone drops the error of a rollback after the transaction already
// ended (its context was cancelled).
func ignoreDone(err error) error {
	if errors.Is(err, sql.ErrTxDone) {
		return nil
	}
	return err
}

// requestLogInsertSQL is an INSERT of rows rows with ? placeholders.
func requestLogInsertSQL(rows int) string {
	one := "(" + strings.Repeat("?, ", len(requestLogColumns)-1) + "?)"
	var b strings.Builder
	b.WriteString("INSERT INTO request_logs (")
	b.WriteString(strings.Join(requestLogColumns, ", "))
	b.WriteString(") VALUES ")
	for i := range rows {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(one)
	}
	return b.String()
}

// dollarPlaceholders numbers the ? placeholders of q as PostgreSQL's $1,
// $2, …; q must hold no ? but its placeholders (no string literals).
func dollarPlaceholders(q string) string {
	var b strings.Builder
	b.Grow(len(q) + len(q)/4)
	n := 0
	for {
		i := strings.IndexByte(q, '?')
		if i < 0 {
			b.WriteString(q)
			return b.String()
		}
		n++
		b.WriteString(q[:i])
		b.WriteByte('$')
		b.WriteString(strconv.Itoa(n))
		q = q[i+1:]
	}
}
