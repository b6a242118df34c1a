-- Joining a running attempt (issue 13). A repeat of a keyed request still
-- in progress follows the attempt instead of getting 409; when the repeat
-- lands on another replica than the attempt's, the holder publishes the
-- response as it flows into idempotency_live, and wakes followers with
-- NOTIFY. Rows exist only while somebody follows an attempt, and are
-- deleted shortly after it ends (the completed record holds the body).
--
-- Rows of one attempt (owner) are its head (off = -1: status, headers as
-- JSON), body pieces in order (off = the byte offset), and its end
-- (off = -2: how it ended, as JSON).
--
-- join_count counts the repeats that joined an attempt of the key.
-- +goose Up
CREATE TABLE idempotency_live (
    id         TEXT NOT NULL,   -- the record's id
    owner      TEXT NOT NULL,   -- the attempt's owner token
    off        BIGINT NOT NULL,
    data       BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (id, owner, off)
);
ALTER TABLE idempotency_records ADD COLUMN join_count INTEGER NOT NULL DEFAULT 0;

-- +goose Down
ALTER TABLE idempotency_records DROP COLUMN join_count;
DROP TABLE idempotency_live;
