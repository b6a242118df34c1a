package models

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// PeriodStart is the start of the budget period holding t: its UTC day or
// UTC month.
func PeriodStart(period string, t time.Time) time.Time {
	t = t.UTC()
	if period == PeriodMonth {
		return time.Date(t.Year(), t.Month(), 1, 0, 0, 0, 0, time.UTC)
	}
	return time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, time.UTC)
}

// PeriodEnd is the end of the period that starts at start.
func PeriodEnd(period string, start time.Time) time.Time {
	if period == PeriodMonth {
		return start.AddDate(0, 1, 0)
	}
	return start.AddDate(0, 0, 1)
}

// BudgetState is a key's spending in one period.
type BudgetState struct {
	SpentMicros, ReservedMicros int64
}

// ReserveBudget holds between need and want micro-dollars of the key's
// budget for the period starting at period — as much of want as is left,
// and at least need — in one conditional upsert: it succeeds only if what
// is spent, what is held (by requests in flight and by replicas' unused
// slices) and need together stay within limit, and something is left, so
// concurrent requests on every replica cannot overspend. granted is what
// it reserved, 0 when refused; the state is then read afresh.
func (s *Store) ReserveBudget(ctx context.Context, keyID string, period time.Time, need, want, limit int64) (st BudgetState, granted int64, err error) {
	want = max(want, need)
	if need <= limit && limit > 0 {
		avail := "(CAST(@limit AS BIGINT) - client_key_budgets.spent_micros - client_key_budgets.reserved_micros)"
		grant := s.least() + "(CAST(@want AS BIGINT), " + avail + ")"
		args := map[string]any{"key": keyID, "p": period.Unix(), "need": need, "want": want, "limit": limit, "first": min(want, limit)}
		rows, err := s.db.WithContext(ctx).Raw(`INSERT INTO client_key_budgets (key_id, period_start, spent_micros, reserved_micros, granted_micros)
VALUES (@key, @p, 0, CAST(@first AS BIGINT), CAST(@first AS BIGINT))
ON CONFLICT (key_id, period_start) DO UPDATE SET reserved_micros = client_key_budgets.reserved_micros + `+grant+`,
  granted_micros = `+grant+`
WHERE `+avail+` >= CAST(@need AS BIGINT) AND `+avail+` > 0
RETURNING spent_micros, reserved_micros, granted_micros`, args).Rows()
		if err != nil {
			return st, 0, fmt.Errorf("models: reserve budget: %w", err)
		}
		defer rows.Close()
		if rows.Next() {
			if err := rows.Scan(&st.SpentMicros, &st.ReservedMicros, &granted); err != nil {
				return st, 0, fmt.Errorf("models: reserve budget: %w", err)
			}
			return st, granted, drain(rows)
		}
		if err := rows.Err(); err != nil {
			return st, 0, fmt.Errorf("models: reserve budget: %w", err)
		}
		rows.Close()
	}
	st, err = s.Budget(ctx, keyID, period)
	return st, 0, err
}

// SettleBudget gives back reserved micro-dollars of what the key holds and
// adds cost to what it spent.
func (s *Store) SettleBudget(ctx context.Context, keyID string, period time.Time, reserved, cost int64) error {
	err := s.db.WithContext(ctx).Exec(`UPDATE client_key_budgets
SET reserved_micros = reserved_micros - ?, spent_micros = spent_micros + ?
WHERE key_id = ? AND period_start = ?`, reserved, cost, keyID, period.Unix()).Error
	if err != nil {
		return fmt.Errorf("models: settle budget: %w", err)
	}
	return nil
}

// Budget reads a key's spending in the period starting at period.
func (s *Store) Budget(ctx context.Context, keyID string, period time.Time) (BudgetState, error) {
	var st BudgetState
	err := s.db.WithContext(ctx).Raw(`SELECT spent_micros, reserved_micros FROM client_key_budgets WHERE key_id = ? AND period_start = ?`,
		keyID, period.Unix()).Row().Scan(&st.SpentMicros, &st.ReservedMicros)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return st, fmt.Errorf("models: budget: %w", err)
	}
	return st, nil
}

// Budgets reads each budgeted key's spending in its current period, for
// the keys page.
func (s *Store) Budgets(ctx context.Context, keys []ClientKey, now time.Time) (map[string]BudgetState, error) {
	out := map[string]BudgetState{}
	for _, k := range keys {
		if k.BudgetMicros == 0 {
			continue
		}
		st, err := s.Budget(ctx, k.ID, PeriodStart(k.BudgetPeriod, now))
		if err != nil {
			return nil, err
		}
		out[k.ID] = st
	}
	return out, nil
}

// RateState is what a key's token bucket holds after a request was taken.
type RateState struct {
	ReqMicros, TokMicros int64 // available requests and tokens, x 1e6
}

// TakeRate takes up to n requests from the key's token bucket, refilled at
// rpm requests and tpm tokens per minute up to a minute's worth, in one
// conditional upsert. It succeeds only while a whole request is available
// (rpm > 0) and the tokens are not in debt (tpm > 0); a limit of 0 is not
// checked (with rpm 0 all n are granted). granted is how many requests it
// took, 0 when refused; the state is then read as it is. nowMs is unix
// milliseconds.
func (s *Store) TakeRate(ctx context.Context, keyID string, rpm, tpm, nowMs, n int64) (st RateState, granted int64, err error) {
	least, greatest := s.least(), "GREATEST"
	if !s.isPostgres() {
		greatest = "MAX"
	}
	elapsed := least + "(" + greatest + "(CAST(@now AS BIGINT) - client_key_rates.at_ms, 0), 60000)"
	// Parameters are cast: PostgreSQL would take them as integer, and
	// rpm * 1000000 overflows that above 2147 rpm.
	// Refilled amounts, capped at one minute's worth (the bucket's size).
	req := least + "(CAST(@rpm AS BIGINT) * 1000000, client_key_rates.req_micros + " + elapsed + " * CAST(@rpm AS BIGINT) * 1000 / 60)"
	tok := least + "(CAST(@tpm AS BIGINT) * 1000000, client_key_rates.tok_micros + " + elapsed + " * CAST(@tpm AS BIGINT) * 1000 / 60)"
	// Requests taken from the bucket, and granted: all n without an rpm.
	take, grant := "0", "CAST(@n AS BIGINT)"
	first, firstGrant := int64(0), n // into a new, full bucket
	if rpm > 0 {
		take = least + "(CAST(@n AS BIGINT), " + req + " / 1000000)"
		grant, first = take, min(n, rpm)
		firstGrant = first
	}
	args := map[string]any{"key": keyID, "rpm": rpm, "tpm": tpm, "now": nowMs, "n": n, "first": first, "firstGrant": firstGrant}
	rows, err := s.db.WithContext(ctx).Raw(`INSERT INTO client_key_rates (key_id, req_micros, tok_micros, at_ms, granted)
VALUES (@key, (CAST(@rpm AS BIGINT) - CAST(@first AS BIGINT)) * 1000000, CAST(@tpm AS BIGINT) * 1000000, CAST(@now AS BIGINT), CAST(@firstGrant AS BIGINT))
ON CONFLICT (key_id) DO UPDATE SET req_micros = `+req+` - `+take+` * 1000000, tok_micros = `+tok+`,
  at_ms = `+greatest+`(client_key_rates.at_ms, CAST(@now AS BIGINT)), granted = `+grant+`
WHERE (CAST(@rpm AS BIGINT) = 0 OR `+req+` >= 1000000) AND (CAST(@tpm AS BIGINT) = 0 OR `+tok+` > 0)
RETURNING req_micros, tok_micros, granted`, args).Rows()
	if err != nil {
		return st, 0, fmt.Errorf("models: take rate: %w", err)
	}
	defer rows.Close()
	if !rows.Next() {
		if err := rows.Err(); err != nil {
			return st, 0, fmt.Errorf("models: take rate: %w", err)
		}
		rows.Close()
		// Refused: read the bucket as it is, for Retry-After.
		err := s.db.WithContext(ctx).Raw("SELECT "+req+" AS req_micros, "+tok+" AS tok_micros FROM client_key_rates WHERE key_id = @key", args).
			Row().Scan(&st.ReqMicros, &st.TokMicros)
		if err != nil {
			return st, 0, fmt.Errorf("models: read rate: %w", err)
		}
		return st, 0, nil
	}
	if err := rows.Scan(&st.ReqMicros, &st.TokMicros, &granted); err != nil {
		return st, 0, fmt.Errorf("models: take rate: %w", err)
	}
	return st, granted, drain(rows)
}

func (s *Store) least() string {
	if s.isPostgres() {
		return "LEAST"
	}
	return "MIN"
}

// drain steps a RETURNING statement to its end and closes it: SQLite keeps
// the statement's transaction (and the connection's snapshot) open until
// then.
func drain(rows *sql.Rows) error {
	for rows.Next() {
	}
	err := rows.Err()
	if cerr := rows.Close(); err == nil {
		err = cerr
	}
	return err
}

// SettleRate charges tokens actually used to the key's bucket (which may
// go into debt, refusing requests until it refills) and gives back unused
// requests a replica took (at most a full bucket of rpm).
func (s *Store) SettleRate(ctx context.Context, keyID string, rpm, tokens, unused int64) error {
	err := s.db.WithContext(ctx).Exec(`UPDATE client_key_rates
SET tok_micros = tok_micros - CAST(? AS BIGINT) * 1000000,
  req_micros = `+s.least()+`(CAST(? AS BIGINT) * 1000000, req_micros + CAST(? AS BIGINT) * 1000000)
WHERE key_id = ?`, tokens, rpm, unused, keyID).Error
	if err != nil {
		return fmt.Errorf("models: settle rate: %w", err)
	}
	return nil
}
