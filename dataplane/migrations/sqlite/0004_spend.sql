-- The gateway's upstream calls next to what the cache saved: calls, tokens used and dollars
-- spent per tenant, model and day.
ALTER TABLE usage ADD COLUMN upstream_calls INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN tokens_used INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN usd_spent REAL NOT NULL DEFAULT 0;
