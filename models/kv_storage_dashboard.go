package models

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"time"

	"gorm.io/gorm"
)

// The dashboard's sign-in state that must be shared by every replica: the
// secret its cookies and form tokens are signed with, the sessions ended
// by signing out, and the count of failed sign-ins.

// dashboardSecretKey is the kv_store key of the signing secret.
const dashboardSecretKey = "secret:dashboard"

// DashboardSecret returns the 32-byte secret the dashboard signs its
// session cookies and CSRF tokens with, creating it on first use. Every
// replica reads the same row, so a cookie signed by one verifies on all.
func (s *Store) DashboardSecret(ctx context.Context) ([]byte, error) {
	fresh := make([]byte, 32)
	if _, err := rand.Read(fresh); err != nil {
		return nil, fmt.Errorf("models: dashboard secret: %w", err)
	}
	db := s.db.WithContext(ctx)
	// Two replicas starting together both insert; the first wins and both
	// read its value.
	if err := db.Exec("INSERT INTO kv_store (k, v, expires_at) VALUES (?, ?, NULL) ON CONFLICT (k) DO NOTHING",
		dashboardSecretKey, fresh).Error; err != nil {
		return nil, fmt.Errorf("models: dashboard secret: %w", err)
	}
	var e kvEntry
	if err := db.Where("k = ?", dashboardSecretKey).Take(&e).Error; err != nil {
		return nil, fmt.Errorf("models: dashboard secret: %w", err)
	}
	if len(e.V) < 32 {
		return nil, errors.New("models: dashboard secret: stored value too short")
	}
	return e.V, nil
}

// revokedPrefix keys the sessions ended by signing out.
const revokedPrefix = "revoked-session:"

// RevokeSession records that session id was signed out; the record lives
// until the session would have expired anyway.
func (s *Store) RevokeSession(ctx context.Context, id string, until time.Time) error {
	err := s.db.WithContext(ctx).Exec(
		"INSERT INTO kv_store (k, v, expires_at) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET expires_at = excluded.expires_at",
		revokedPrefix+id, []byte{1}, until).Error
	if err != nil {
		return fmt.Errorf("models: revoke session: %w", err)
	}
	return nil
}

// SessionRevoked reports whether session id was signed out.
func (s *Store) SessionRevoked(ctx context.Context, id string) (bool, error) {
	var e kvEntry
	err := s.db.WithContext(ctx).
		Where("k = ? AND (expires_at IS NULL OR expires_at > ?)", revokedPrefix+id, s.now()).Take(&e).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("models: session revoked: %w", err)
	}
	return true, nil
}

// CountLoginFailure counts one sign-in attempt from key against a fixed
// window that starts with the first attempt, and returns the attempts in
// the window so far, this one included, and when the window ends. It is
// one atomic statement, so replicas counting in parallel never read the
// same count: the Nth concurrent attempt sees N. Callers reserve the
// attempt before checking the password and ForgiveLoginFailure it when the
// password was right.
func (s *Store) CountLoginFailure(ctx context.Context, key string, window time.Duration) (int64, time.Time, error) {
	now := s.now().UnixMilli()
	ends := now + window.Milliseconds()
	var row struct {
		Failures   int64
		WindowEnds int64
	}
	err := s.db.WithContext(ctx).Raw(
		"INSERT INTO dashboard_login_failures (k, failures, window_ends) VALUES (?, 1, ?)"+
			" ON CONFLICT (k) DO UPDATE SET"+
			" failures = CASE WHEN dashboard_login_failures.window_ends <= ? THEN 1 ELSE dashboard_login_failures.failures + 1 END,"+
			" window_ends = CASE WHEN dashboard_login_failures.window_ends <= ? THEN excluded.window_ends ELSE dashboard_login_failures.window_ends END"+
			" RETURNING failures, window_ends",
		key, ends, now, now).Scan(&row).Error
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("models: count login failure: %w", err)
	}
	return row.Failures, time.UnixMilli(row.WindowEnds), nil
}

// ForgiveLoginFailure takes back one attempt counted for key: a sign-in
// with the right password is not a failure.
func (s *Store) ForgiveLoginFailure(ctx context.Context, key string) error {
	err := s.db.WithContext(ctx).Exec(
		"UPDATE dashboard_login_failures SET failures = failures - 1 WHERE k = ? AND failures > 0", key).Error
	if err != nil {
		return fmt.Errorf("models: forgive login failure: %w", err)
	}
	return nil
}

// sweepLoginFailures deletes counts whose window has ended.
func (s *Store) sweepLoginFailures(ctx context.Context) (int64, error) {
	res := s.db.WithContext(ctx).Exec("DELETE FROM dashboard_login_failures WHERE window_ends <= ?", s.now().UnixMilli())
	if res.Error != nil {
		return 0, fmt.Errorf("models: sweep login failures: %w", res.Error)
	}
	return res.RowsAffected, nil
}
