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

// ReserveBudget holds estimate micro-dollars of the key's budget for the
// period starting at period, in one conditional upsert: it succeeds only if
// what is spent, what requests in flight hold and the estimate together
// stay within limit (and something is left when the estimate is 0), so
// concurrent requests on every replica cannot overspend. ok is false when
// the budget is refused; the state is then read afresh.
func (s *Store) ReserveBudget(ctx context.Context, keyID string, period time.Time, estimate, limit int64) (st BudgetState, ok bool, err error) {
	args := map[string]any{"key": keyID, "p": period.Unix(), "est": estimate, "limit": limit}
	if estimate < limit {
		rows, err := s.db.WithContext(ctx).Raw(`INSERT INTO client_key_budgets (key_id, period_start, spent_micros, reserved_micros)
VALUES (@key, @p, 0, @est)
ON CONFLICT (key_id, period_start) DO UPDATE SET reserved_micros = client_key_budgets.reserved_micros + @est
WHERE client_key_budgets.spent_micros + client_key_budgets.reserved_micros + @est <= @limit
  AND client_key_budgets.spent_micros + client_key_budgets.reserved_micros < @limit
RETURNING spent_micros, reserved_micros`, args).Rows()
		if err != nil {
			return st, false, fmt.Errorf("models: reserve budget: %w", err)
		}
		defer rows.Close()
		if rows.Next() {
			if err := rows.Scan(&st.SpentMicros, &st.ReservedMicros); err != nil {
				return st, false, fmt.Errorf("models: reserve budget: %w", err)
			}
			return st, true, drain(rows)
		}
		if err := rows.Err(); err != nil {
			return st, false, fmt.Errorf("models: reserve budget: %w", err)
		}
		rows.Close()
	}
	st, err = s.Budget(ctx, keyID, period)
	return st, false, err
}

// SettleBudget gives back a reservation and adds the actual cost.
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

// rateUnit is the fixed-point scale of client_key_rates.
const rateUnit = 1_000_000

// TakeRate takes one request from the key's token bucket, refilled at rpm
// requests and tpm tokens per minute up to a minute's worth, in one
// conditional upsert. It succeeds only while a whole request is available
// (rpm > 0) and the tokens are not in debt (tpm > 0); a limit of 0 is not
// checked. nowMs is unix milliseconds.
func (s *Store) TakeRate(ctx context.Context, keyID string, rpm, tpm, nowMs int64) (RateState, bool, error) {
	least, greatest := "LEAST", "GREATEST"
	if !s.isPostgres() {
		least, greatest = "MIN", "MAX"
	}
	elapsed := least + "(" + greatest + "(CAST(@now AS BIGINT) - client_key_rates.at_ms, 0), 60000)"
	// Parameters are cast: PostgreSQL would take them as integer, and
	// rpm * 1000000 overflows that above 2147 rpm.
	// Refilled amounts, capped at one minute's worth (the bucket's size).
	req := least + "(CAST(@rpm AS BIGINT) * 1000000, client_key_rates.req_micros + " + elapsed + " * CAST(@rpm AS BIGINT) * 1000 / 60)"
	tok := least + "(CAST(@tpm AS BIGINT) * 1000000, client_key_rates.tok_micros + " + elapsed + " * CAST(@tpm AS BIGINT) * 1000 / 60)"
	args := map[string]any{"key": keyID, "rpm": rpm, "tpm": tpm, "now": nowMs}
	rows, err := s.db.WithContext(ctx).Raw(`INSERT INTO client_key_rates (key_id, req_micros, tok_micros, at_ms)
VALUES (@key, CAST(@rpm AS BIGINT) * 1000000 - 1000000, CAST(@tpm AS BIGINT) * 1000000, CAST(@now AS BIGINT))
ON CONFLICT (key_id) DO UPDATE SET req_micros = `+req+` - 1000000, tok_micros = `+tok+`,
  at_ms = `+greatest+`(client_key_rates.at_ms, CAST(@now AS BIGINT))
WHERE (CAST(@rpm AS BIGINT) = 0 OR `+req+` >= 1000000) AND (CAST(@tpm AS BIGINT) = 0 OR `+tok+` > 0)
RETURNING req_micros, tok_micros`, args).Rows()
	if err != nil {
		return RateState{}, false, fmt.Errorf("models: take rate: %w", err)
	}
	defer rows.Close()
	var st RateState
	if !rows.Next() {
		if err := rows.Err(); err != nil {
			return st, false, fmt.Errorf("models: take rate: %w", err)
		}
		rows.Close()
		// Refused: read the bucket as it is, for Retry-After.
		err := s.db.WithContext(ctx).Raw("SELECT "+req+" AS req_micros, "+tok+" AS tok_micros FROM client_key_rates WHERE key_id = @key", args).
			Row().Scan(&st.ReqMicros, &st.TokMicros)
		if err != nil {
			return st, false, fmt.Errorf("models: read rate: %w", err)
		}
		return st, false, nil
	}
	if err := rows.Scan(&st.ReqMicros, &st.TokMicros); err != nil {
		return st, false, fmt.Errorf("models: take rate: %w", err)
	}
	return st, true, drain(rows)
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

// SettleRate charges a request's actual tokens to the key's bucket (which
// may go into debt, refusing requests until it refills) and, when refund is
// set, gives its request back (it was refused later, never forwarded).
func (s *Store) SettleRate(ctx context.Context, keyID string, tokens int64, refund bool) error {
	back := int64(0)
	if refund {
		back = rateUnit
	}
	err := s.db.WithContext(ctx).Exec(`UPDATE client_key_rates SET tok_micros = tok_micros - ?, req_micros = req_micros + ? WHERE key_id = ?`,
		tokens*rateUnit, back, keyID).Error
	if err != nil {
		return fmt.Errorf("models: settle rate: %w", err)
	}
	return nil
}
