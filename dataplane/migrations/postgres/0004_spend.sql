-- The gateway's upstream calls next to what the cache saved: calls, tokens used and dollars
-- spent per tenant, model and day.
ALTER TABLE usage ADD COLUMN IF NOT EXISTS upstream_calls BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN IF NOT EXISTS tokens_used BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN IF NOT EXISTS usd_spent DOUBLE PRECISION NOT NULL DEFAULT 0;
