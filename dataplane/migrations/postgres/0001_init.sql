-- Tenants the dataplane has served, index versions and their states, usage and the hit audit.
CREATE TABLE IF NOT EXISTS tenants (
    name        TEXT PRIMARY KEY,
    created_at  BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS index_versions (
    tenant      TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    dimension   BIGINT NOT NULL,
    state       TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant, fingerprint)
);

CREATE TABLE IF NOT EXISTS usage (
    tenant        TEXT NOT NULL,
    model         TEXT NOT NULL,
    day           TEXT NOT NULL,
    lookups       BIGINT NOT NULL DEFAULT 0,
    hits          BIGINT NOT NULL DEFAULT 0,
    tokens_saved  BIGINT NOT NULL DEFAULT 0,
    usd_saved     DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, model, day)
);

CREATE TABLE IF NOT EXISTS hit_audit (
    id          BIGSERIAL PRIMARY KEY,
    at_ms       BIGINT NOT NULL,
    tenant      TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    entry_id    TEXT NOT NULL,
    path        TEXT NOT NULL,
    similarity  DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS hit_audit_tenant_at ON hit_audit (tenant, at_ms);
