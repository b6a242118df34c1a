-- Managed client keys (issue 16): keys created on the dashboard or through
-- the admin API, their budget and rate-limit counters, and the cost of each
-- request in integer micro-dollars.
--
-- client_keys holds a SHA-256 digest of each key, never the key: the key is
-- shown once, at creation. Every change bumps updated_at, which replicas
-- poll to refresh their in-memory table (revocation within 2 s).
--
-- client_key_budgets: one row per key and budget period (UTC day or month
-- start). A request reserves its estimated cost with one conditional upsert
-- (spent + reserved + estimate <= budget), and settles it with its actual
-- cost, so concurrent requests on any replica cannot overspend.
--
-- client_key_rates: a token bucket per key for RPM and TPM, in millionths,
-- refilled from elapsed time by the same conditional upsert that takes a
-- request.
--
-- request_logs and request_rollups gain cost_micros; older rows read 0.
-- +goose Up
CREATE TABLE client_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    digest        TEXT NOT NULL UNIQUE,  -- hex SHA-256 of the key
    hint          TEXT NOT NULL,         -- its last 4 characters
    created_at    DATETIME NOT NULL,
    updated_at    DATETIME NOT NULL,
    expires_at    DATETIME,
    revoked_at    DATETIME,
    models        TEXT NOT NULL DEFAULT '',   -- allowed models, comma-separated; empty: all
    rpm           INTEGER NOT NULL DEFAULT 0,  -- 0: no limit
    tpm           INTEGER NOT NULL DEFAULT 0,
    budget_micros INTEGER NOT NULL DEFAULT 0,  -- USD x 1e6; 0: no budget
    budget_period TEXT NOT NULL DEFAULT '',   -- day or month
    notes         TEXT NOT NULL DEFAULT ''
);
CREATE INDEX client_keys_updated_at_idx ON client_keys (updated_at);

CREATE TABLE client_key_budgets (
    key_id          TEXT NOT NULL,
    period_start    INTEGER NOT NULL,          -- unix seconds, UTC
    spent_micros    INTEGER NOT NULL DEFAULT 0,
    reserved_micros INTEGER NOT NULL DEFAULT 0, -- held by requests in flight
    PRIMARY KEY (key_id, period_start)
);

CREATE TABLE client_key_rates (
    key_id     TEXT PRIMARY KEY,
    req_micros INTEGER NOT NULL,  -- requests available x 1e6
    tok_micros INTEGER NOT NULL,  -- tokens available x 1e6 (negative: in debt)
    at_ms      INTEGER NOT NULL   -- last refill, unix milliseconds
);

ALTER TABLE request_logs ADD COLUMN cost_micros INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_rollups ADD COLUMN cost_micros INTEGER NOT NULL DEFAULT 0;

-- +goose Down
ALTER TABLE request_rollups DROP COLUMN cost_micros;
ALTER TABLE request_logs DROP COLUMN cost_micros;
DROP TABLE client_key_rates;
DROP TABLE client_key_budgets;
DROP TABLE client_keys;
