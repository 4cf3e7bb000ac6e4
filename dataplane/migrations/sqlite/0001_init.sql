-- Tenants the dataplane has served, index versions and their states, usage and the hit audit.
CREATE TABLE IF NOT EXISTS tenants (
    name        TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS index_versions (
    tenant      TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    dimension   INTEGER NOT NULL,
    state       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant, fingerprint)
);

CREATE TABLE IF NOT EXISTS usage (
    tenant        TEXT NOT NULL,
    model         TEXT NOT NULL,
    day           TEXT NOT NULL,
    lookups       INTEGER NOT NULL DEFAULT 0,
    hits          INTEGER NOT NULL DEFAULT 0,
    tokens_saved  INTEGER NOT NULL DEFAULT 0,
    usd_saved     REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, model, day)
);

CREATE TABLE IF NOT EXISTS hit_audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms       INTEGER NOT NULL,
    tenant      TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    entry_id    TEXT NOT NULL,
    path        TEXT NOT NULL,
    similarity  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS hit_audit_tenant_at ON hit_audit (tenant, at_ms);
