// Package migrations holds the versioned SQL schema, one folder per dialect
// with the same version numbers, and applies it with goose at start-up.
//
// Files are append-only: never edit an applied migration, add a new one.
package migrations

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"io/fs"
	"log/slog"

	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"
)

//go:embed postgres/*.sql sqlite/*.sql
var files embed.FS

// Dialect names a supported database.
type Dialect string

const (
	Postgres Dialect = "postgres"
	SQLite   Dialect = "sqlite"
)

// Up applies every pending migration. On PostgreSQL it holds an advisory
// lock for the whole run, so replicas that start together migrate once and
// the others wait, then find nothing to do.
func Up(ctx context.Context, db *sql.DB, dialect Dialect, logger *slog.Logger) error {
	p, err := provider(db, dialect, logger)
	if err != nil {
		return err
	}
	results, err := p.Up(ctx)
	if err != nil {
		return fmt.Errorf("migrations: up: %w", err)
	}
	for _, r := range results {
		logger.Info("migration applied", slog.String("file", r.Source.Path), slog.Duration("took", r.Duration))
	}
	return nil
}

// Check refuses to serve from a binary older than its database: a schema
// version this binary does not know means a newer release migrated it.
func Check(ctx context.Context, db *sql.DB, dialect Dialect) error {
	p, err := provider(db, dialect, slog.New(slog.DiscardHandler))
	if err != nil {
		return err
	}
	current, err := p.GetDBVersion(ctx)
	if err != nil {
		return fmt.Errorf("migrations: read version: %w", err)
	}
	known := p.ListSources()
	if n := len(known); n > 0 && current > known[n-1].Version {
		return fmt.Errorf("migrations: database schema is at version %d but this binary knows only up to %d: run the newer release", current, known[n-1].Version)
	}
	return nil
}

func provider(db *sql.DB, dialect Dialect, logger *slog.Logger) (*goose.Provider, error) {
	sub, err := fs.Sub(files, string(dialect))
	if err != nil {
		return nil, fmt.Errorf("migrations: %w", err)
	}
	opts := []goose.ProviderOption{goose.WithSlog(logger)}
	gooseDialect := goose.DialectSQLite3
	if dialect == Postgres {
		gooseDialect = goose.DialectPostgres
		// Poll the lock every second (goose waits 5 s by default), for up to 5 minutes.
		locker, err := lock.NewPostgresSessionLocker(lock.WithLockTimeout(1, 300))
		if err != nil {
			return nil, fmt.Errorf("migrations: %w", err)
		}
		opts = append(opts, goose.WithSessionLocker(locker))
	}
	p, err := goose.NewProvider(gooseDialect, db, sub, opts...)
	if err != nil {
		return nil, fmt.Errorf("migrations: %w", err)
	}
	return p, nil
}
