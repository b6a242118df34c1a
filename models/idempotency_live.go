package models

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"gorm.io/gorm"
)

// Joining a running attempt from another replica (handlers/proxy/follow.go): the
// holder publishes its response into idempotency_live as it flows, once
// somebody asks, and followers read it from there. NOTIFY wakes both sides
// at once; polling covers a lost notification.
const (
	// ChannelJoin asks the holder of a key id (the payload) to publish.
	ChannelJoin = "idempotency_join"
	// ChannelLive says an attempt of a key id (the payload) published more.
	ChannelLive = "idempotency_live"
)

// Offsets of the rows that are not body pieces.
const (
	LiveHead int64 = -1 // upstream's status and headers
	LiveEnd  int64 = -2 // how the attempt ended
)

// LiveChunk is one published row of a running attempt.
type LiveChunk struct {
	Off  int64
	Data []byte
}

// Shared reports whether other processes may hold keys in this store: on
// PostgreSQL replicas share it; the embedded SQLite serves one process.
func (s *Store) Shared() bool { return s.isPostgres() }

// PublishLive appends one row of a running attempt and wakes followers,
// in one statement. A row already published is left as it is.
func (s *Store) PublishLive(ctx context.Context, id, owner string, off int64, data []byte) error {
	err := s.db.WithContext(ctx).Exec(
		"WITH ins AS (INSERT INTO idempotency_live (id, owner, off, data, created_at) VALUES (?, ?, ?, ?, now()) ON CONFLICT DO NOTHING) "+
			"SELECT pg_notify(?, ?)", id, owner, off, data, ChannelLive, id).Error
	if err != nil {
		return fmt.Errorf("models: publish running response: %w", err)
	}
	return nil
}

// LiveChunks reads an attempt's head and end rows and its body pieces from
// offset from on, in order.
func (s *Store) LiveChunks(ctx context.Context, id, owner string, from int64) ([]LiveChunk, error) {
	var rows []LiveChunk
	err := s.db.WithContext(ctx).Raw(
		"SELECT off, data FROM idempotency_live WHERE id = ? AND owner = ? AND (off >= ? OR off < 0) ORDER BY off = -2, off", /* head, body in order, end */
		id, owner, from).Scan(&rows).Error
	if err != nil {
		return nil, fmt.Errorf("models: read running response: %w", err)
	}
	return rows, nil
}

// AskToPublish asks whichever replica holds the key id to publish its
// running attempt.
func (s *Store) AskToPublish(ctx context.Context, id string) error {
	if err := s.db.WithContext(ctx).Exec("SELECT pg_notify(?, ?)", ChannelJoin, id).Error; err != nil {
		return fmt.Errorf("models: ask to publish: %w", err)
	}
	return nil
}

// DeleteLive removes what an attempt published.
func (s *Store) DeleteLive(ctx context.Context, id, owner string) error {
	if err := s.db.WithContext(ctx).Exec("DELETE FROM idempotency_live WHERE id = ? AND owner = ?", id, owner).Error; err != nil {
		return fmt.Errorf("models: delete running response: %w", err)
	}
	return nil
}

// SweepLive deletes rows older than a minute of attempts no longer running
// (their holder died before cleaning up).
func (s *Store) SweepLive(ctx context.Context) (int64, error) {
	if !s.isPostgres() {
		return 0, nil
	}
	res := s.db.WithContext(ctx).Exec("DELETE FROM idempotency_live l WHERE l.created_at < now() - interval '1 minute' AND NOT EXISTS " +
		"(SELECT 1 FROM idempotency_records r WHERE r.id = l.id AND r.owner = l.owner AND r.state = 'in_progress')")
	if res.Error != nil {
		return 0, fmt.Errorf("models: sweep running responses: %w", res.Error)
	}
	return res.RowsAffected, nil
}

// AttemptState is what a follower checks of the attempt it follows.
type AttemptState struct {
	IdempotencyRecord
	Lapsed bool // in progress, but its holder stopped renewing the lease
}

// IdempotencyAttempt reads a record without its body, with the database's
// judgement of its lease.
func (s *Store) IdempotencyAttempt(ctx context.Context, id string) (AttemptState, error) {
	var row AttemptState
	err := s.db.WithContext(ctx).Model(&IdempotencyRecord{}).
		Select(recordColumnsSQL+", (state = ? AND locked_until < ?) AS lapsed", StateInProgress, s.sqlNow(0)).
		Where("id = ?", id).Take(&row).Error
	if errors.Is(err, gorm.ErrRecordNotFound) {
		return row, ErrNotFound
	}
	if err != nil {
		return row, fmt.Errorf("models: load idempotency key: %w", err)
	}
	return row, nil
}

// MarkIdempotencyJoined counts n repeats that joined a running attempt.
func (s *Store) MarkIdempotencyJoined(ctx context.Context, id string, n int) error {
	err := s.db.WithContext(ctx).Model(&IdempotencyRecord{}).Where("id = ?", id).
		Update("join_count", gorm.Expr("join_count + ?", n)).Error
	if err != nil {
		return fmt.Errorf("models: count idempotency join: %w", err)
	}
	return nil
}

// Listener is what Listen reports to.
type Listener struct {
	Notify    func(channel, payload string)
	Connected func()          // (again) listening: notifications sent before may be lost
	Failed    func(err error) // the connection failed; Listen reconnects
}

// Listen receives the join and live notifications of every replica on its
// own PostgreSQL connection, reconnecting after a failure, until ctx ends.
// On SQLite it returns at once.
func (s *Store) Listen(ctx context.Context, l Listener) {
	if !s.isPostgres() {
		return
	}
	for wait := 100 * time.Millisecond; ctx.Err() == nil; wait = min(2*wait, 5*time.Second) {
		err := s.listenOnce(ctx, l.Notify, func() {
			wait = 100 * time.Millisecond
			l.Connected()
		})
		if ctx.Err() != nil {
			return
		}
		l.Failed(err)
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
}

func (s *Store) listenOnce(ctx context.Context, notify func(channel, payload string), connected func()) error {
	conn, err := pgx.Connect(ctx, s.dsn)
	if err != nil {
		return err
	}
	defer func() { _ = conn.Close(context.Background()) }()
	for _, ch := range []string{ChannelJoin, ChannelLive} {
		if _, err := conn.Exec(ctx, "LISTEN "+ch); err != nil {
			return err
		}
	}
	connected()
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return err
		}
		notify(n.Channel, n.Payload)
	}
}
