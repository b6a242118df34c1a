-- Joining a running attempt (issue 13): join_count counts the repeats that
-- joined an attempt of the key. On SQLite (one process) joiners follow the
-- attempt in memory; idempotency_live exists so both schemas stay alike,
-- and stays empty.
-- +goose Up
CREATE TABLE idempotency_live (
    id         TEXT NOT NULL,
    owner      TEXT NOT NULL,
    off        INTEGER NOT NULL,
    data       BLOB NOT NULL,
    created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (id, owner, off)
);
ALTER TABLE idempotency_records ADD COLUMN join_count INTEGER NOT NULL DEFAULT 0;

-- +goose Down
ALTER TABLE idempotency_records DROP COLUMN join_count;
DROP TABLE idempotency_live;
