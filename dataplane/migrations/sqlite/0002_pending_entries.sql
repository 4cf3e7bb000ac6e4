-- Stores accepted while the embedder was down: kept here (durably) until a replica embeds
-- them and moves them into the entry store. `entry` is the entry without its vector, as JSON.
CREATE TABLE IF NOT EXISTS pending_entries (
    id            TEXT PRIMARY KEY,
    tenant        TEXT NOT NULL,
    scope         TEXT NOT NULL,
    namespace     TEXT NOT NULL,
    entry         TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    claimed_until INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS pending_entries_tenant ON pending_entries (tenant, created_at);
