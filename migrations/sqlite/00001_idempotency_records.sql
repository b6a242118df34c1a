-- Idempotency records: one row per (client, method, path, Idempotency-Key),
-- claimed atomically by INSERT ... ON CONFLICT DO NOTHING on the primary key.
-- +goose Up
CREATE TABLE idempotency_records (
    id             TEXT PRIMARY KEY,           -- hex SHA-256 of the scope: client and key
    client         TEXT NOT NULL,
    method         TEXT NOT NULL,
    path           TEXT NOT NULL,
    idem_key       TEXT NOT NULL,
    fingerprint    TEXT NOT NULL,              -- hex SHA-256 of method, path, query and body
    state          TEXT NOT NULL,              -- in_progress, completed, released
    owner          TEXT NOT NULL DEFAULT '',   -- random token of the attempt holding the lease
    locked_until   DATETIME NOT NULL,
    status         INTEGER NOT NULL DEFAULT 0,
    headers        TEXT NOT NULL DEFAULT '{}', -- JSON object of the allow-listed response headers
    body           BLOB,
    body_size      INTEGER NOT NULL DEFAULT 0,
    stream         BOOLEAN NOT NULL DEFAULT 0,
    replayable     BOOLEAN NOT NULL DEFAULT 1,
    replay_count   INTEGER NOT NULL DEFAULT 0,
    last_replay_at DATETIME,
    attempts       INTEGER NOT NULL DEFAULT 1,
    release_reason TEXT NOT NULL DEFAULT '',
    created_at     DATETIME NOT NULL,
    updated_at     DATETIME NOT NULL,
    expires_at     DATETIME NOT NULL
);
-- The sweeper deletes by expiry; the dashboard lists newest first and searches by key.
CREATE INDEX idempotency_records_expires_at_idx ON idempotency_records (expires_at);
CREATE INDEX idempotency_records_created_at_idx ON idempotency_records (created_at DESC, id DESC);
CREATE INDEX idempotency_records_idem_key_idx ON idempotency_records (idem_key);

-- +goose Down
DROP TABLE idempotency_records;
