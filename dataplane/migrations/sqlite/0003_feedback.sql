-- Verdicts on served hits (POST /v1/feedback). Replicas read rows above the last seq they
-- applied. `vector` is the query's embedding (little-endian f32) in `index_version`.
CREATE TABLE IF NOT EXISTS feedback (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant        TEXT NOT NULL,
    entry_id      TEXT NOT NULL,
    request_id    TEXT,
    correct       BOOLEAN NOT NULL,
    prompt        TEXT,
    vector        BLOB,
    index_version TEXT NOT NULL,
    score         REAL,
    at_ms         INTEGER NOT NULL
);
-- Feedback names a hit by its request id; the audit trail says which entry served it.
CREATE INDEX IF NOT EXISTS hit_audit_request ON hit_audit (tenant, request_id);
