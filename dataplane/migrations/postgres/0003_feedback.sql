-- Verdicts on served hits (POST /v1/feedback). Replicas read rows above the last seq they
-- applied; inserts take an advisory lock so seqs commit in order and none is skipped.
-- `vector` is the query's embedding (little-endian f32) in `index_version`.
CREATE TABLE IF NOT EXISTS feedback (
    seq           BIGSERIAL PRIMARY KEY,
    tenant        TEXT NOT NULL,
    entry_id      TEXT NOT NULL,
    request_id    TEXT,
    correct       BOOLEAN NOT NULL,
    prompt        TEXT,
    vector        BYTEA,
    index_version TEXT NOT NULL,
    score         DOUBLE PRECISION,
    at_ms         BIGINT NOT NULL
);
-- Feedback names a hit by its request id; the audit trail says which entry served it.
CREATE INDEX IF NOT EXISTS hit_audit_request ON hit_audit (tenant, request_id);
