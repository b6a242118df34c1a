-- Two dashboard changes.
--
-- 1. Failed sign-ins are counted in their own table with one atomic
--    upsert per attempt (models.CountLoginFailure). The Fiber limiter's
--    read-then-write on kv_store let two replicas undercount: 9 of 40
--    parallel wrong passwords were checked against a limit of 5.
--
-- 2. The latency histogram gets buckets below 50 ms. A proxy adds well
--    under a millisecond, and one 0–50 ms bucket made 1 ms requests read
--    "25 ms p50". lat_le_50 held every request up to 50 ms; those counts
--    cannot be split after the fact, so the column is renamed
--    lat_le_50_unsplit and read as "somewhere in 0–50 ms"
--    (models.LatencyQuantile). New rows fill the fine buckets only.
-- +goose Up
CREATE TABLE dashboard_login_failures (
    k           TEXT PRIMARY KEY,     -- the client address
    failures    INTEGER NOT NULL,      -- attempts counted in the current window
    window_ends INTEGER NOT NULL       -- unix milliseconds
);
CREATE INDEX dashboard_login_failures_window_ends_idx ON dashboard_login_failures (window_ends);

ALTER TABLE request_rollups RENAME COLUMN lat_le_50 TO lat_le_50_unsplit;
ALTER TABLE request_rollups ADD COLUMN lat_le_0 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_rollups ADD COLUMN lat_le_1 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_rollups ADD COLUMN lat_le_2 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_rollups ADD COLUMN lat_le_5 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_rollups ADD COLUMN lat_le_10 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_rollups ADD COLUMN lat_le_25 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_rollups ADD COLUMN lat_le_50 INTEGER NOT NULL DEFAULT 0;

-- +goose Down
ALTER TABLE request_rollups DROP COLUMN lat_le_50;
ALTER TABLE request_rollups DROP COLUMN lat_le_25;
ALTER TABLE request_rollups DROP COLUMN lat_le_10;
ALTER TABLE request_rollups DROP COLUMN lat_le_5;
ALTER TABLE request_rollups DROP COLUMN lat_le_2;
ALTER TABLE request_rollups DROP COLUMN lat_le_1;
ALTER TABLE request_rollups DROP COLUMN lat_le_0;
ALTER TABLE request_rollups RENAME COLUMN lat_le_50_unsplit TO lat_le_50;
DROP TABLE dashboard_login_failures;
