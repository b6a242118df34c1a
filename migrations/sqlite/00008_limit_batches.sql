-- Limits taken in batches (issue 16): a replica takes several requests from
-- a key's rate bucket, or a slice of its budget, in one conditional
-- statement and hands them out from memory. The statement records what it
-- granted (it may grant less than asked) so that RETURNING can report it.
-- +goose Up
ALTER TABLE client_key_rates ADD COLUMN granted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE client_key_budgets ADD COLUMN granted_micros INTEGER NOT NULL DEFAULT 0;

-- +goose Down
ALTER TABLE client_key_budgets DROP COLUMN granted_micros;
ALTER TABLE client_key_rates DROP COLUMN granted;
