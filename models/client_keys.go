package models

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"gorm.io/gorm"
)

// Budget periods of a managed client key.
const (
	PeriodDay   = "day"
	PeriodMonth = "month"
)

// ClientKeyPrefix starts every key the proxy generates, so a leaked one is
// recognisable (and greppable by secret scanners).
const ClientKeyPrefix = "pxy_"

// ErrKeyRevoked is returned when a revoked client key would be changed:
// revocation is final.
var ErrKeyRevoked = errors.New("models: client key is revoked")

// ErrNameTaken is returned when a client key name is already in use.
var ErrNameTaken = errors.New("models: client key name already in use")

// ClientKey is one row of client_keys: a managed client key, without the
// key itself (only its SHA-256 digest is stored).
type ClientKey struct {
	ID           string `gorm:"primaryKey"`
	Name         string
	Digest       string // hex SHA-256 of the key
	Hint         string // last 4 characters of the key
	CreatedAt    time.Time
	UpdatedAt    time.Time
	ExpiresAt    *time.Time
	RevokedAt    *time.Time
	Models       string // allowed models, comma-separated; empty allows all
	RPM          int64  `gorm:"column:rpm"`
	TPM          int64  `gorm:"column:tpm"`
	BudgetMicros int64  // USD x 1e6; 0: no budget
	BudgetPeriod string // PeriodDay or PeriodMonth; empty without a budget
	Notes        string
}

// AllowedModels splits Models; nil allows every model.
func (k *ClientKey) AllowedModels() []string {
	var out []string
	for _, m := range strings.Split(k.Models, ",") {
		if m = strings.TrimSpace(m); m != "" {
			out = append(out, m)
		}
	}
	return out
}

// State is "revoked", "expired" or "active" at now.
func (k *ClientKey) State(now time.Time) string {
	switch {
	case k.RevokedAt != nil:
		return "revoked"
	case k.ExpiresAt != nil && !now.Before(*k.ExpiresAt):
		return "expired"
	}
	return "active"
}

// ClientKeyLimits are the settings an admin chooses for a key.
type ClientKeyLimits struct {
	ExpiresAt    *time.Time
	Models       []string
	RPM, TPM     int64
	BudgetMicros int64
	BudgetPeriod string
	Notes        string
}

// DigestKey is the stored form of a client key.
func DigestKey(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:])
}

// newClientKey returns a fresh key: the prefix and 256 random bits.
func newClientKey() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return ClientKeyPrefix + base64.RawURLEncoding.EncodeToString(b)
}

func newKeyID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return "ck_" + hex.EncodeToString(b)
}

// CreateClientKey generates a key, stores its digest and returns the row
// and the key. The key is returned only here; nothing stores or logs it.
func (s *Store) CreateClientKey(ctx context.Context, name string, l ClientKeyLimits) (ClientKey, string, error) {
	key := newClientKey()
	now := s.now()
	k := ClientKey{
		ID: newKeyID(), Name: name, Digest: DigestKey(key), Hint: key[len(key)-4:],
		CreatedAt: now, UpdatedAt: now,
	}
	applyLimits(&k, l)
	if err := s.db.WithContext(ctx).Create(&k).Error; err != nil {
		if errors.Is(err, gorm.ErrDuplicatedKey) {
			return ClientKey{}, "", ErrNameTaken
		}
		return ClientKey{}, "", fmt.Errorf("models: create client key: %w", err)
	}
	return k, key, nil
}

func applyLimits(k *ClientKey, l ClientKeyLimits) {
	k.ExpiresAt = nil
	if l.ExpiresAt != nil {
		t := l.ExpiresAt.UTC().Truncate(time.Microsecond)
		k.ExpiresAt = &t
	}
	k.Models = strings.Join(l.Models, ",")
	k.RPM, k.TPM = l.RPM, l.TPM
	k.BudgetMicros, k.BudgetPeriod = l.BudgetMicros, l.BudgetPeriod
	if k.BudgetMicros == 0 {
		k.BudgetPeriod = ""
	}
	k.Notes = l.Notes
}

// ListClientKeys returns every managed key, oldest first.
func (s *Store) ListClientKeys(ctx context.Context) ([]ClientKey, error) {
	var out []ClientKey
	if err := s.db.WithContext(ctx).Order("created_at, id").Find(&out).Error; err != nil {
		return nil, fmt.Errorf("models: list client keys: %w", err)
	}
	return out, nil
}

// ClientKeyByID returns one key, or ErrNotFound.
func (s *Store) ClientKeyByID(ctx context.Context, id string) (ClientKey, error) {
	var k ClientKey
	err := s.db.WithContext(ctx).Where("id = ?", id).Take(&k).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return ClientKey{}, ErrNotFound
	}
	if err != nil {
		return ClientKey{}, fmt.Errorf("models: client key: %w", err)
	}
	return k, nil
}

// UpdateClientKey replaces a key's limits, expiry and notes (ErrNotFound
// if it does not exist, ErrKeyRevoked if it is revoked). Its rate-limit
// bucket starts afresh, full at the new limits.
func (s *Store) UpdateClientKey(ctx context.Context, id string, l ClientKeyLimits) (ClientKey, error) {
	var k ClientKey
	applyLimits(&k, l)
	// Single statements, no transaction: SQLite shared by two processes
	// refuses a read transaction's upgrade to a write (SQLITE_BUSY).
	res := s.db.WithContext(ctx).Model(&ClientKey{}).Where("id = ? AND revoked_at IS NULL", id).Updates(map[string]any{
		"expires_at": k.ExpiresAt, "models": k.Models, "rpm": k.RPM, "tpm": k.TPM,
		"budget_micros": k.BudgetMicros, "budget_period": k.BudgetPeriod, "notes": k.Notes, "updated_at": s.now(),
	})
	if res.Error != nil {
		return ClientKey{}, fmt.Errorf("models: update client key: %w", res.Error)
	}
	if res.RowsAffected == 0 {
		if k, err := s.ClientKeyByID(ctx, id); err != nil {
			return ClientKey{}, err
		} else if k.RevokedAt != nil {
			return ClientKey{}, ErrKeyRevoked
		}
		return ClientKey{}, ErrNotFound
	}
	if err := s.db.WithContext(ctx).Exec("DELETE FROM client_key_rates WHERE key_id = ?", id).Error; err != nil {
		return ClientKey{}, fmt.Errorf("models: update client key: %w", err)
	}
	return s.ClientKeyByID(ctx, id)
}

// RevokeClientKey marks a key revoked now (ErrNotFound if it does not
// exist); revoking twice keeps the first time.
func (s *Store) RevokeClientKey(ctx context.Context, id string) (ClientKey, error) {
	now := s.now()
	res := s.db.WithContext(ctx).Model(&ClientKey{}).Where("id = ? AND revoked_at IS NULL", id).
		Updates(map[string]any{"revoked_at": now, "updated_at": now})
	if res.Error != nil {
		return ClientKey{}, fmt.Errorf("models: revoke client key: %w", res.Error)
	}
	return s.ClientKeyByID(ctx, id)
}

// ClientKeysVersion is a cheap summary that changes whenever any key does:
// replicas poll it and reload the table only when it moved.
func (s *Store) ClientKeysVersion(ctx context.Context) (string, error) {
	var row struct {
		N int64
		M string
	}
	err := s.db.WithContext(ctx).Raw("SELECT COUNT(*) AS n, COALESCE(CAST(MAX(updated_at) AS TEXT), '') AS m FROM client_keys").Scan(&row).Error
	if err != nil {
		return "", fmt.Errorf("models: client keys version: %w", err)
	}
	return fmt.Sprintf("%d/%s", row.N, row.M), nil
}

// ErrInvalidClientKey wraps a refused name or setting; its text says what
// is wrong and is safe to show.
var ErrInvalidClientKey = errors.New("invalid client key")

// Bounds on what an admin may set.
const (
	maxKeyName    = 64
	maxKeyModels  = 100
	maxModelName  = 200
	maxKeyNotes   = 1000
	maxRateLimit  = 1_000_000_000
	maxBudgetUSD  = 1_000_000
	budgetMicroes = 1_000_000
)

// ValidateClientKeyName checks a new key's name: 1 to 64 letters, digits,
// spaces and "-_.@", not "open" (the name of unauthenticated traffic).
func ValidateClientKeyName(name string) error {
	if name == "" || len(name) > maxKeyName {
		return fmt.Errorf("%w: the name must be 1 to %d characters", ErrInvalidClientKey, maxKeyName)
	}
	for _, r := range name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune(" -_.@", r)) {
			return fmt.Errorf("%w: the name may hold only letters, digits, spaces and - _ . @", ErrInvalidClientKey)
		}
	}
	if strings.EqualFold(name, "open") {
		return fmt.Errorf("%w: the name %q is reserved", ErrInvalidClientKey, name)
	}
	return nil
}

// Validate checks limits an admin entered.
func (l *ClientKeyLimits) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidClientKey}, args...)...)
	}
	switch {
	case l.RPM < 0 || l.RPM > maxRateLimit || l.TPM < 0 || l.TPM > maxRateLimit:
		return bad("rpm and tpm must be from 0 (no limit) to %d", maxRateLimit)
	case l.BudgetMicros < 0 || l.BudgetMicros > maxBudgetUSD*budgetMicroes:
		return bad("the budget must be from 0 (none) to %d USD", maxBudgetUSD)
	case l.BudgetMicros > 0 && l.BudgetPeriod != PeriodDay && l.BudgetPeriod != PeriodMonth:
		return bad("a budget needs a period: day or month")
	case l.BudgetMicros == 0 && l.BudgetPeriod != "" && l.BudgetPeriod != PeriodDay && l.BudgetPeriod != PeriodMonth:
		return bad("the budget period must be day or month")
	case len(l.Models) > maxKeyModels:
		return bad("at most %d models", maxKeyModels)
	case len(l.Notes) > maxKeyNotes:
		return bad("notes are at most %d characters", maxKeyNotes)
	}
	for _, m := range l.Models {
		if m == "" || len(m) > maxModelName || strings.ContainsAny(m, ", \t\r\n") {
			return bad("model names must be 1 to %d characters without commas or spaces", maxModelName)
		}
	}
	return nil
}

// USDToMicros converts dollars to whole micro-dollars.
func USDToMicros(usd float64) int64 { return int64(math.Round(usd * budgetMicroes)) }
