-- Key-value store behind the dashboard's Fiber middleware: sessions, CSRF
-- tokens and login throttling (models.KVStorage implements fiber.Storage on
-- it), so several replicas on one database share them. Keys carry a prefix
-- per user ("session:", "csrf:", "login:").
--
-- Also an index for the dashboard's key list filtered by state: in flight
-- and released keys are few among up to millions of completed ones, and
-- without it "in flight, newest first" walks the whole created_at index
-- (630 ms at 1M keys when nothing is in flight). The index leaves completed
-- keys out, so it stays small; queries repeat its predicate.
-- +goose Up
CREATE TABLE kv_store (
    k          TEXT PRIMARY KEY,
    v          BYTEA NOT NULL,
    expires_at TIMESTAMPTZ          -- NULL: never expires
);
-- The sweep deletes expired entries in batches; entries without expiry stay out.
CREATE INDEX kv_store_expires_at_idx ON kv_store (expires_at) WHERE expires_at IS NOT NULL;

CREATE INDEX idempotency_records_open_state_idx ON idempotency_records (state, created_at DESC, id DESC)
    WHERE state <> 'completed';

-- +goose Down
DROP INDEX idempotency_records_open_state_idx;
DROP TABLE kv_store;
