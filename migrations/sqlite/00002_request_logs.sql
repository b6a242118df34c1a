-- Request log: one row per request (no bodies, no secrets), written in
-- batches by models.LogWriter, listed newest first by the dashboard.
-- Every filter the list offers has an index that leads with the filter and
-- ends with (created_at, id), so a filtered page is one index range scan in
-- keyset order instead of a scan-and-sort of the whole log.
--
-- request_rollups: additive counters, upserted by the same transaction that
-- inserts the raw rows, so charts, totals and top-N tables never scan the
-- raw log. Each request is counted in several rows, which keeps every
-- dashboard query to a few thousand rows even over 30 days:
--   * in two scopes: the totals (scope 0, client and model left '') that
--     charts and headline numbers read, and per client and model (scope 1)
--     for the top-N tables;
--   * at three grains (span): its minute, hour and UTC day. A window reads
--     day rows for its whole days, hour rows for whole hours at the edges
--     and minute rows only for the ragged ends.
-- +goose Up
CREATE TABLE request_logs (
    id                  INTEGER PRIMARY KEY,
    created_at          DATETIME NOT NULL,
    client              TEXT NOT NULL DEFAULT '',
    method              TEXT NOT NULL DEFAULT '',
    path                TEXT NOT NULL DEFAULT '',
    model               TEXT NOT NULL DEFAULT '',
    stream              BOOLEAN NOT NULL DEFAULT 0,
    status              INTEGER NOT NULL DEFAULT 0,  -- 0: no response status (cut off, cancelled)
    outcome             TEXT NOT NULL DEFAULT '',
    duration_ms         INTEGER NOT NULL DEFAULT 0,
    ttfb_ms             INTEGER NOT NULL DEFAULT 0,
    request_bytes       INTEGER NOT NULL DEFAULT 0,
    response_bytes      INTEGER NOT NULL DEFAULT 0,
    prompt_tokens       INTEGER NOT NULL DEFAULT 0,
    completion_tokens   INTEGER NOT NULL DEFAULT 0,
    total_tokens        INTEGER NOT NULL DEFAULT 0,
    cached_tokens       INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens    INTEGER NOT NULL DEFAULT 0,
    upstream_request_id TEXT NOT NULL DEFAULT '',
    idempotency_key     TEXT NOT NULL DEFAULT '',
    error               TEXT NOT NULL DEFAULT '',
    client_ip           TEXT NOT NULL DEFAULT '',
    user_agent          TEXT NOT NULL DEFAULT ''
);
-- The unfiltered list and the retention sweep (created_at < cutoff).
CREATE INDEX request_logs_created_at_idx ON request_logs (created_at DESC, id DESC);
-- The status filter is a class (2xx..5xx): an index on the expression keeps
-- "5xx, newest first" a range scan, where an index on status would need a sort.
CREATE INDEX request_logs_status_class_idx ON request_logs ((status / 100), created_at DESC, id DESC);
CREATE INDEX request_logs_model_idx ON request_logs (model, created_at DESC, id DESC);
CREATE INDEX request_logs_client_idx ON request_logs (client, created_at DESC, id DESC);
CREATE INDEX request_logs_path_idx ON request_logs (path, created_at DESC, id DESC);
CREATE INDEX request_logs_outcome_idx ON request_logs (outcome, created_at DESC, id DESC);
-- Most requests carry no key; the partial index leaves them out. Queries
-- repeat the predicate so the planner can use it with bound parameters.
CREATE INDEX request_logs_idempotency_key_idx ON request_logs (idempotency_key, created_at DESC, id DESC)
    WHERE idempotency_key <> '';

CREATE TABLE request_rollups (
    scope                  INTEGER NOT NULL,  -- 0: all clients and models; 1: per client and model
    span                   INTEGER NOT NULL,  -- bucket width in seconds: 60, 3600 or 86400
    bucket                 INTEGER NOT NULL,  -- unix seconds of the bucket start, UTC
    client                 TEXT NOT NULL,
    model                  TEXT NOT NULL,
    status_class           INTEGER NOT NULL,  -- 2..5 for 2xx..5xx, 0 for anything else
    requests               INTEGER NOT NULL DEFAULT 0,
    prompt_tokens          INTEGER NOT NULL DEFAULT 0,
    completion_tokens      INTEGER NOT NULL DEFAULT 0,
    total_tokens           INTEGER NOT NULL DEFAULT 0,
    request_bytes          INTEGER NOT NULL DEFAULT 0,
    response_bytes         INTEGER NOT NULL DEFAULT 0,
    duration_ms_sum        INTEGER NOT NULL DEFAULT 0,
    replayed               INTEGER NOT NULL DEFAULT 0,
    idempotency_conflicts  INTEGER NOT NULL DEFAULT 0,
    idempotency_mismatches INTEGER NOT NULL DEFAULT 0,
    upstream_errors        INTEGER NOT NULL DEFAULT 0,
    -- Latency histogram: requests whose duration_ms is in (previous bound, bound].
    lat_le_50              INTEGER NOT NULL DEFAULT 0,
    lat_le_100             INTEGER NOT NULL DEFAULT 0,
    lat_le_250             INTEGER NOT NULL DEFAULT 0,
    lat_le_500             INTEGER NOT NULL DEFAULT 0,
    lat_le_1000            INTEGER NOT NULL DEFAULT 0,
    lat_le_2500            INTEGER NOT NULL DEFAULT 0,
    lat_le_5000            INTEGER NOT NULL DEFAULT 0,
    lat_le_10000           INTEGER NOT NULL DEFAULT 0,
    lat_le_30000           INTEGER NOT NULL DEFAULT 0,
    lat_le_60000           INTEGER NOT NULL DEFAULT 0,
    lat_le_120000          INTEGER NOT NULL DEFAULT 0,
    lat_le_inf             INTEGER NOT NULL DEFAULT 0,
    -- The key the writer upserts on; it also serves every window query
    -- (scope = ? AND span = ? AND bucket range) and the retention sweep.
    PRIMARY KEY (scope, span, bucket, client, model, status_class)
);

-- +goose Down
DROP TABLE request_rollups;
DROP TABLE request_logs;
