// Package models is the only package that talks to the database: the
// idempotency records, the request log and its roll-ups, through GORM on
// PostgreSQL or the embedded SQLite.
package models

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/glebarez/sqlite"
	"golang.org/x/time/rate"
	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"

	"github.com/openai-idempotent-proxy/proxy/migrations"
)

// ErrNotFound is returned by lookups that find no row.
var ErrNotFound = errors.New("models: not found")

// Store holds the database handle and the clock every query uses.
type Store struct {
	db      *gorm.DB
	dialect migrations.Dialect
	now     func() time.Time
	dsn     string // PostgreSQL's, for the notification listener
	// The claims' and completions' batchers, on PostgreSQL; nil on SQLite,
	// whose statements cost no round trip.
	claims      *batcher[ClaimRequest, bool]
	completions *batcher[completion, bool]
}

// Options select and tune the database.
type Options struct {
	// DatabaseURL is a postgres:// URL; empty selects SQLite in DataDir.
	DatabaseURL string
	// DataDir holds the SQLite file (created if missing).
	DataDir string
	// Logger receives GORM's warnings and errors; nil discards them.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now. Tests inject a fake one.
	Now func() time.Time
	// ConnectTimeout bounds each new PostgreSQL connection unless the URL
	// sets connect_timeout; 0 means 10 s. Without it a database host that
	// accepts connections but never answers would hang the start for ever.
	ConnectTimeout time.Duration
}

// Open connects to the database and applies pending migrations.
func Open(ctx context.Context, opts Options) (*Store, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	utcNow := func() time.Time { return now().UTC() }
	cfg := &gorm.Config{
		TranslateError: true,
		// Single statements need no BEGIN/COMMIT round trips around them;
		// the claim and completion are each one atomic statement.
		SkipDefaultTransaction: true,
		NowFunc:                utcNow,
		Logger: newQuietLogger(logger.NewSlogLogger(opts.Logger, logger.Config{
			SlowThreshold:             slowQuery,
			LogLevel:                  logger.Warn,
			IgnoreRecordNotFoundError: true,
			ParameterizedQueries:      true, // never log values: they may hold keys or bodies
		})),
	}
	var (
		dialector gorm.Dialector
		dialect   migrations.Dialect
	)
	if opts.DatabaseURL != "" {
		dialector, dialect = postgres.Open(withConnectTimeout(opts.DatabaseURL, cmp.Or(opts.ConnectTimeout, 10*time.Second))), migrations.Postgres
	} else {
		if err := os.MkdirAll(opts.DataDir, 0o750); err != nil {
			return nil, fmt.Errorf("models: create data directory: %w", err)
		}
		dialector, dialect = sqlite.Open(sqliteDSN(filepath.Join(opts.DataDir, "proxy.db"))), migrations.SQLite
	}
	db, err := gorm.Open(dialector, cfg)
	if err != nil {
		return nil, fmt.Errorf("models: open %s: %w", dialect, err)
	}
	sqlDB, err := db.DB()
	if err != nil {
		return nil, fmt.Errorf("models: %w", err)
	}
	if dialect == migrations.Postgres {
		sqlDB.SetMaxOpenConns(32)
		sqlDB.SetMaxIdleConns(16)
		sqlDB.SetConnMaxIdleTime(5 * time.Minute)
	} else {
		// SQLite has one writer; a handful of connections lets reads overlap
		// writes in WAL mode, and busy_timeout queues the writers.
		sqlDB.SetMaxOpenConns(8)
	}
	s := &Store{db: db, dialect: dialect, now: utcNow}
	if dialect == migrations.Postgres {
		s.dsn = withConnectTimeout(opts.DatabaseURL, cmp.Or(opts.ConnectTimeout, 10*time.Second))
	}
	if err := s.Ping(ctx); err != nil {
		_ = sqlDB.Close()
		return nil, err
	}
	if err := migrations.Up(ctx, sqlDB, dialect, opts.Logger); err != nil {
		_ = sqlDB.Close()
		return nil, err
	}
	if err := migrations.Check(ctx, sqlDB, dialect); err != nil {
		_ = sqlDB.Close()
		return nil, err
	}
	if dialect == migrations.Postgres {
		s.startBatchers(sqlDB)
	}
	return s, nil
}

// withConnectTimeout adds connect_timeout (whole seconds, at least 1) to a
// postgres:// URL that has none; other forms are left as they are.
func withConnectTimeout(dsn string, d time.Duration) string {
	u, err := url.Parse(dsn)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return dsn
	}
	q := u.Query()
	if q.Get("connect_timeout") == "" {
		q.Set("connect_timeout", strconv.Itoa(max(1, int(d.Seconds()))))
		u.RawQuery = q.Encode()
	}
	return u.String()
}

// slowQuery is the duration above which a statement is logged.
const slowQuery = time.Second

// quietLogger skips GORM's tracing for statements that will not be logged
// (the slog logger renders the SQL text of every statement before
// deciding, which cost half the request-log writer's CPU), logs failures
// at most once a second (a database outage would otherwise log every
// statement), and keeps the wrapped logger's ParamsFilter, so SQL is
// logged with placeholders, never with its values (keys, bodies).
type quietLogger struct {
	logger.Interface
	errors *rate.Sometimes
}

func newQuietLogger(l logger.Interface) quietLogger {
	return quietLogger{Interface: l, errors: &rate.Sometimes{Interval: time.Second}}
}

func (l quietLogger) LogMode(level logger.LogLevel) logger.Interface {
	return quietLogger{Interface: l.Interface.LogMode(level), errors: l.errors}
}

func (l quietLogger) Trace(ctx context.Context, begin time.Time, fc func() (string, int64), err error) {
	failed := err != nil && !errors.Is(err, gorm.ErrRecordNotFound)
	switch {
	case failed:
		l.errors.Do(func() { l.Interface.Trace(ctx, begin, fc, err) })
	case time.Since(begin) >= slowQuery:
		l.Interface.Trace(ctx, begin, fc, err)
	}
}

// Error drops GORM's "failed to initialize database" line: Open returns
// that error, and the caller reports it once as the cause.
func (l quietLogger) Error(ctx context.Context, msg string, data ...any) {
	if !strings.HasPrefix(msg, "failed to initialize database") {
		l.Interface.Error(ctx, msg, data...)
	}
}

// ParamsFilter hides the values of every statement from the log.
func (l quietLogger) ParamsFilter(ctx context.Context, sql string, params ...any) (string, []any) {
	if f, ok := l.Interface.(gorm.ParamsFilter); ok {
		return f.ParamsFilter(ctx, sql, params...)
	}
	return sql, nil
}

// sqliteDSN tunes the embedded database: WAL so readers never block the
// writer, a busy timeout so writers queue instead of failing, immediate
// transactions so a transaction never fails upgrading a read lock, and a
// sortable UTC time format so time comparisons in SQL are correct.
func sqliteDSN(path string) string {
	return "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_txlock=immediate&_time_format=sqlite"
}

// Dialect reports which database the store runs on.
func (s *Store) Dialect() migrations.Dialect { return s.dialect }

// DB exposes the GORM handle to tests and tools in this module.
func (s *Store) DB() *gorm.DB { return s.db }

// Now is the store's clock, in UTC.
func (s *Store) Now() time.Time { return s.now() }

// Ping checks that the database answers, within a short deadline.
func (s *Store) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	sqlDB, err := s.db.DB()
	if err != nil {
		return fmt.Errorf("models: %w", err)
	}
	if err := sqlDB.PingContext(ctx); err != nil {
		return fmt.Errorf("models: database unreachable: %w", err)
	}
	return nil
}

// Close releases the connection pool.
func (s *Store) Close() error {
	if s.claims != nil {
		s.claims.close()
		s.completions.close()
	}
	sqlDB, err := s.db.DB()
	if err != nil {
		return err
	}
	return sqlDB.Close()
}

// isPostgres is a small helper for the few queries whose SQL differs.
func (s *Store) isPostgres() bool { return s.dialect == migrations.Postgres }

// likeEscape escapes LIKE wildcards in user input.
func likeEscape(s string) string {
	return strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`).Replace(s)
}
