//! Metadata through sqlx: tenants, index versions, usage accounting and the hit audit trail.
//!
//! Lookups never wait for this database: they hand a [`UsageEvent`] to a bounded queue that a
//! background task drains in batches, one transaction each. When the queue is full (the
//! database is down or slow) events are dropped and counted, and serving carries on.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};
use tokio::sync::mpsc;

use super::{StoreError, UsageEvent, UsageSink};
use crate::metrics::Metrics;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Usage totals for one tenant and model.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct ModelUsage {
    pub model: String,
    pub lookups: u64,
    pub hits: u64,
    pub tokens_saved: u64,
    pub usd_saved: f64,
}

#[derive(Clone)]
pub struct MetadataStore {
    pool: SqlitePool,
}

fn meta(action: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Metadata {
        action,
        source: Box::new(source),
    }
}

impl MetadataStore {
    /// Embedded mode: a SQLite file in the data directory, migrated on open.
    pub async fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(meta("open SQLite"))?;
        SQLITE_MIGRATIONS
            .run(&pool)
            .await
            .map_err(|e| StoreError::Metadata {
                action: "migrate",
                source: Box::new(e.into()),
            })?;
        Ok(Self { pool })
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(meta("reach"))?;
        Ok(())
    }

    pub async fn register_tenant(&self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tenants (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(meta("register a tenant"))?;
        Ok(())
    }

    /// Record an index version as `state` (`active`, `building`, `ready`, `retired`).
    pub async fn set_index_version(
        &self,
        tenant: &str,
        fingerprint: &str,
        dimension: usize,
        state: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO index_versions (tenant, fingerprint, dimension, state, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (tenant, fingerprint) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
        )
        .bind(tenant)
        .bind(fingerprint)
        .bind(i64::try_from(dimension).unwrap_or(i64::MAX))
        .bind(state)
        .bind(now_ms)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(meta("record an index version"))?;
        Ok(())
    }

    pub async fn usage(&self, tenant: &str) -> Result<Vec<ModelUsage>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, SUM(lookups) AS lookups, SUM(hits) AS hits,
                    SUM(tokens_saved) AS tokens_saved, SUM(usd_saved) AS usd_saved
             FROM usage WHERE tenant = ? GROUP BY model ORDER BY model",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await
        .map_err(meta("read usage"))?;
        rows.iter()
            .map(|r| {
                Ok(ModelUsage {
                    model: r.try_get("model")?,
                    lookups: u64::try_from(r.try_get::<i64, _>("lookups")?).unwrap_or(0),
                    hits: u64::try_from(r.try_get::<i64, _>("hits")?).unwrap_or(0),
                    tokens_saved: u64::try_from(r.try_get::<i64, _>("tokens_saved")?).unwrap_or(0),
                    usd_saved: r.try_get("usd_saved")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(meta("decode usage"))
    }

    /// Number of audited hits of a tenant (for tests and support).
    pub async fn audited_hits(&self, tenant: &str) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM hit_audit WHERE tenant = ?")
            .bind(tenant)
            .fetch_one(&self.pool)
            .await
            .map_err(meta("count audited hits"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn write_batch(&self, events: &[UsageEvent]) -> Result<(), StoreError> {
        // Aggregate per (tenant, model, day) so a batch is a handful of upserts.
        let mut totals: HashMap<(String, String, String), ModelUsage> = HashMap::new();
        for e in events {
            let day = day_of(e.at_ms);
            let t = totals
                .entry((e.tenant.clone(), e.model.clone(), day))
                .or_default();
            t.lookups += 1;
            t.hits += u64::from(e.hit);
            t.tokens_saved += e.tokens_saved;
            t.usd_saved += e.usd_saved;
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(meta("begin a transaction"))?;
        for ((tenant, model, day), t) in &totals {
            sqlx::query(
                "INSERT INTO usage (tenant, model, day, lookups, hits, tokens_saved, usd_saved)
                 VALUES (?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (tenant, model, day) DO UPDATE SET
                   lookups = usage.lookups + excluded.lookups,
                   hits = usage.hits + excluded.hits,
                   tokens_saved = usage.tokens_saved + excluded.tokens_saved,
                   usd_saved = usage.usd_saved + excluded.usd_saved",
            )
            .bind(tenant)
            .bind(model)
            .bind(day)
            .bind(i64::try_from(t.lookups).unwrap_or(i64::MAX))
            .bind(i64::try_from(t.hits).unwrap_or(i64::MAX))
            .bind(i64::try_from(t.tokens_saved).unwrap_or(i64::MAX))
            .bind(t.usd_saved)
            .execute(&mut *tx)
            .await
            .map_err(meta("record usage"))?;
        }
        for e in events.iter().filter(|e| e.hit) {
            sqlx::query(
                "INSERT INTO hit_audit (at_ms, tenant, request_id, entry_id, path, similarity)
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(e.at_ms)
            .bind(&e.tenant)
            .bind(&e.request_id)
            .bind(e.entry_id.as_deref().unwrap_or(""))
            .bind(e.path.unwrap_or(""))
            .bind(f64::from(e.similarity.unwrap_or(0.0)))
            .execute(&mut *tx)
            .await
            .map_err(meta("record a hit in the audit trail"))?;
        }
        tx.commit().await.map_err(meta("commit usage"))?;
        Ok(())
    }
}

/// UTC day `YYYY-MM-DD` of a millisecond timestamp (civil-from-days, Howard Hinnant).
fn day_of(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The queue in front of [`MetadataStore`].
pub struct QueuedUsage {
    tx: mpsc::Sender<UsageEvent>,
    metrics: Arc<Metrics>,
}

impl QueuedUsage {
    /// Start the background writer; it drains the queue until every sender is gone.
    pub fn start(
        store: MetadataStore,
        metrics: Arc<Metrics>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<UsageEvent>(65_536);
        let writer_metrics = metrics.clone();
        let handle = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(1024);
            while rx.recv_many(&mut batch, 1024).await > 0 {
                if let Err(e) = store.write_batch(&batch).await {
                    writer_metrics
                        .usage_events_dropped
                        .inc_by(batch.len() as u64);
                    tracing::warn!(error = %e, events = batch.len(), "failed to record usage; dropped the batch");
                }
                batch.clear();
            }
        });
        (Self { tx, metrics }, handle)
    }
}

impl UsageSink for QueuedUsage {
    fn record(&self, event: UsageEvent) {
        if self.tx.try_send(event).is_err() {
            self.metrics.usage_events_dropped.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::day_of;

    #[test]
    fn days_are_utc_calendar_dates() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(951_782_400_000), "2000-02-29");
        assert_eq!(day_of(1_795_392_000_000), "2026-11-23");
    }
}
