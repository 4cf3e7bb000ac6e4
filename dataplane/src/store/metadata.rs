//! Metadata through sqlx: tenants, index versions, usage accounting and the hit audit trail.
//!
//! Lookups never wait for this database: they hand a [`UsageEvent`] to a bounded queue that a
//! background task drains in batches, one transaction each. When the queue is full (the
//! database is down or slow) events are dropped and counted, and serving carries on.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, Row, SqlitePool};
use tokio::sync::mpsc;

use super::{BackendError, UsageEvent, UsageSink};
use crate::metrics::Metrics;
use semantis_cache::StoreError;
use semantis_cache::entry::{Entry, EntryFilter};
use semantis_cache::index_version::{IndexVersionState, UnknownState};
pub use semantis_cache::ports::{DayUsage, ModelUsage};
use semantis_cache::ports::{Feedback, FeedbackStore, PendingStore, UsageReport};
use semantis_cache::vector::day_of;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Every metadata row, in a form both backends read and write (a backup's `metadata.json`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetadataSnapshot {
    /// (name, created_at)
    pub tenants: Vec<(String, i64)>,
    /// (tenant, fingerprint, dimension, state, created_at, updated_at)
    pub index_versions: Vec<(String, String, i64, String, i64, i64)>,
    /// (tenant, model, day, lookups, hits, tokens_saved, usd_saved)
    pub usage: Vec<(String, String, String, i64, i64, i64, f64)>,
    /// (at_ms, tenant, request_id, entry_id, path, similarity)
    pub hit_audit: Vec<(i64, String, String, String, String, f64)>,
    /// Verdicts on served hits, oldest first (absent from backups made before feedback).
    #[serde(default)]
    pub feedback: Vec<FeedbackRow>,
    /// The gateway's spend: (tenant, model, day, upstream_calls, tokens_used, usd_spent)
    /// (absent from backups made before the gateway).
    #[serde(default)]
    pub spend: Vec<(String, String, String, i64, i64, f64)>,
}

/// One verdict as a backup keeps it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FeedbackRow {
    pub tenant: String,
    pub entry_id: String,
    pub request_id: Option<String>,
    pub correct: bool,
    pub prompt: Option<String>,
    pub vector: Option<Vec<f32>>,
    pub index_version: String,
    pub score: Option<f64>,
    pub at_ms: i64,
}

impl From<&Feedback> for FeedbackRow {
    fn from(f: &Feedback) -> Self {
        Self {
            tenant: f.tenant.clone(),
            entry_id: f.entry_id.clone(),
            request_id: f.request_id.clone(),
            correct: f.correct,
            prompt: f.prompt.clone(),
            vector: f.vector.clone(),
            index_version: f.index_version.clone(),
            score: f.score.map(f64::from),
            at_ms: f.at_ms,
        }
    }
}

const INSERT_FEEDBACK: &str = "INSERT INTO feedback
       (tenant, entry_id, request_id, correct, prompt, vector, index_version, score, at_ms)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING seq";

const READ_FEEDBACK: &str = "SELECT seq, tenant, entry_id, request_id, correct, prompt, vector,
       index_version, score, at_ms
     FROM feedback WHERE seq > $1 ORDER BY seq LIMIT $2";

/// Feedback inserts on Postgres hold this advisory lock until they commit, so a higher seq
/// never becomes visible before a lower one (a reader's cursor would skip it).
const FEEDBACK_LOCK: i64 = 0x5e3a_f33d;

fn vector_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn vector_of(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn feedback_of<R: Row>(r: &R) -> Result<Feedback, sqlx::Error>
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'q> i64: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> String: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<String>: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> bool: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<Vec<u8>>: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
    for<'q> Option<f64>: sqlx::Decode<'q, R::Database> + sqlx::Type<R::Database>,
{
    let vector: Option<Vec<u8>> = r.try_get("vector")?;
    let score: Option<f64> = r.try_get("score")?;
    Ok(Feedback {
        seq: r.try_get("seq")?,
        tenant: r.try_get("tenant")?,
        entry_id: r.try_get("entry_id")?,
        request_id: r.try_get("request_id")?,
        correct: r.try_get("correct")?,
        prompt: r.try_get("prompt")?,
        vector: vector.as_deref().map(vector_of),
        index_version: r.try_get("index_version")?,
        score: score.map(|s| s as f32),
        at_ms: r.try_get("at_ms")?,
    })
}

/// Embedded mode: SQLite in the data directory. Cluster mode: Postgres, shared by replicas.
#[derive(Clone)]
pub enum MetadataStore {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Run the same statement text on whichever pool this is. The SQL is written once, with
/// `$N` placeholders (SQLite numbers `$N` parameters by first appearance, so each appears
/// once and in order).
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match $store {
            MetadataStore::Sqlite($pool) => $body,
            MetadataStore::Postgres($pool) => $body,
        }
    };
}

fn meta(action: &'static str) -> impl FnOnce(sqlx::Error) -> BackendError {
    move |source| BackendError::Metadata {
        action,
        source: Box::new(source),
    }
}

const REGISTER_TENANT: &str =
    "INSERT INTO tenants (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";

const SET_INDEX_VERSION: &str = "INSERT INTO index_versions
       (tenant, fingerprint, dimension, state, created_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (tenant, fingerprint)
     DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at";

const USAGE_SUMS: &str = "CAST(SUM(lookups) AS BIGINT) AS lookups,
       CAST(SUM(hits) AS BIGINT) AS hits, CAST(SUM(tokens_saved) AS BIGINT) AS tokens_saved,
       CAST(SUM(usd_saved) AS DOUBLE PRECISION) AS usd_saved,
       CAST(SUM(upstream_calls) AS BIGINT) AS upstream_calls,
       CAST(SUM(tokens_used) AS BIGINT) AS tokens_used,
       CAST(SUM(usd_spent) AS DOUBLE PRECISION) AS usd_spent";

const UPSERT_USAGE: &str = "INSERT INTO usage
       (tenant, model, day, lookups, hits, tokens_saved, usd_saved, upstream_calls,
        tokens_used, usd_spent)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
     ON CONFLICT (tenant, model, day) DO UPDATE SET
       lookups = usage.lookups + excluded.lookups,
       hits = usage.hits + excluded.hits,
       tokens_saved = usage.tokens_saved + excluded.tokens_saved,
       usd_saved = usage.usd_saved + excluded.usd_saved,
       upstream_calls = usage.upstream_calls + excluded.upstream_calls,
       tokens_used = usage.tokens_used + excluded.tokens_used,
       usd_spent = usage.usd_spent + excluded.usd_spent";

const INSERT_AUDIT: &str = "INSERT INTO hit_audit
       (at_ms, tenant, request_id, entry_id, path, similarity)
     VALUES ($1, $2, $3, $4, $5, $6)";

const INSERT_AUDIT_ROWS: &str =
    "INSERT INTO hit_audit (at_ms, tenant, request_id, entry_id, path, similarity) ";

/// Six binds a row: 6,000 binds stay below SQLite's and Postgres's limits on bind parameters.
const AUDIT_ROWS_PER_STATEMENT: usize = 1000;

/// How long the usage writer gathers events before it writes them. Under load this turns
/// thousands of lookups a second into a few transactions a second; the totals lag by as much.
const USAGE_BATCH_WINDOW: Duration = Duration::from_millis(200);
const USAGE_BATCH_MAX: usize = 16_384;

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl MetadataStore {
    /// Embedded mode: a SQLite file in the data directory, migrated on open.
    pub async fn open_sqlite(path: &Path) -> Result<Self, BackendError> {
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
        let store = Self::Sqlite(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// Cluster mode: Postgres at `url`, with the password from a mounted Secret when given.
    pub async fn open_postgres(url: &str, password: Option<&str>) -> Result<Self, BackendError> {
        let mut options: PgConnectOptions = url.parse().map_err(meta("parse the Postgres URL"))?;
        if let Some(p) = password {
            options = options.password(p);
        }
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy_with(options);
        let store = Self::Postgres(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// Apply pending migrations; concurrent replicas are serialised by sqlx's migration lock.
    pub async fn migrate(&self) -> Result<(), BackendError> {
        let result = match self {
            Self::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await,
            Self::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await,
        };
        result.map_err(|e| BackendError::Metadata {
            action: "migrate",
            source: Box::new(e.into()),
        })
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    pub async fn ping(&self) -> Result<(), BackendError> {
        on_pool!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(meta("reach"))?;
        Ok(())
    }

    pub async fn register_tenant(&self, name: &str, now_ms: i64) -> Result<(), BackendError> {
        on_pool!(self, |pool| sqlx::query(REGISTER_TENANT)
            .bind(name)
            .bind(now_ms)
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(meta("register a tenant"))?;
        Ok(())
    }

    /// Record an index version as `state` (`active`, `building`, `ready`, `retired`).
    pub async fn set_index_version(
        &self,
        tenant: &str,
        fingerprint: &str,
        dimension: usize,
        state: IndexVersionState,
        now_ms: i64,
    ) -> Result<(), BackendError> {
        let dimension = i64::try_from(dimension).unwrap_or(i64::MAX);
        on_pool!(self, |pool| sqlx::query(SET_INDEX_VERSION)
            .bind(tenant)
            .bind(fingerprint)
            .bind(dimension)
            .bind(state.as_str())
            .bind(now_ms)
            .bind(now_ms)
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(meta("record an index version"))?;
        Ok(())
    }

    /// The tenant's active index version (fingerprint, dimension), if one is recorded.
    pub async fn active_version(
        &self,
        tenant: &str,
    ) -> Result<Option<(String, i64)>, BackendError> {
        on_pool!(self, |pool| sqlx::query_as::<_, (String, i64)>(
            "SELECT fingerprint, dimension FROM index_versions
             WHERE tenant = $1 AND state = $2 ORDER BY updated_at DESC LIMIT 1"
        )
        .bind(tenant)
        .bind(IndexVersionState::Active.as_str())
        .fetch_optional(pool)
        .await)
        .map_err(meta("read the active index version"))
    }

    /// The recorded state of one index version, if any.
    pub async fn version_state(
        &self,
        tenant: &str,
        fingerprint: &str,
    ) -> Result<Option<IndexVersionState>, BackendError> {
        let state = on_pool!(self, |pool| sqlx::query_scalar::<_, String>(
            "SELECT state FROM index_versions WHERE tenant = $1 AND fingerprint = $2"
        )
        .bind(tenant)
        .bind(fingerprint)
        .fetch_optional(pool)
        .await)
        .map_err(meta("read an index version"))?;
        state
            .map(|s| s.parse())
            .transpose()
            .map_err(|e: UnknownState| BackendError::Decode {
                table: "index_versions".into(),
                reason: e.to_string(),
            })
    }

    /// Make `fingerprint` the tenant's active version and retire the one it replaces, in one
    /// transaction.
    pub async fn activate_version(
        &self,
        tenant: &str,
        fingerprint: &str,
        dimension: usize,
        now_ms: i64,
    ) -> Result<(), BackendError> {
        let dimension = i64::try_from(dimension).unwrap_or(i64::MAX);
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await.map_err(meta("begin a transaction"))?;
            sqlx::query(
                "UPDATE index_versions SET state = $4, updated_at = $1
                 WHERE tenant = $2 AND state = $5 AND fingerprint <> $3",
            )
            .bind(now_ms)
            .bind(tenant)
            .bind(fingerprint)
            .bind(IndexVersionState::Retired.as_str())
            .bind(IndexVersionState::Active.as_str())
            .execute(&mut *tx)
            .await
            .map_err(meta("retire the previous index version"))?;
            sqlx::query(SET_INDEX_VERSION)
                .bind(tenant)
                .bind(fingerprint)
                .bind(dimension)
                .bind(IndexVersionState::Active.as_str())
                .bind(now_ms)
                .bind(now_ms)
                .execute(&mut *tx)
                .await
                .map_err(meta("activate an index version"))?;
            tx.commit().await.map_err(meta("commit the index switch"))
        })?;
        Ok(())
    }

    /// Versions retired before `cutoff_ms`: (tenant, fingerprint).
    pub async fn retired_before(
        &self,
        cutoff_ms: i64,
    ) -> Result<Vec<(String, String)>, BackendError> {
        on_pool!(self, |pool| sqlx::query_as::<_, (String, String)>(
            "SELECT tenant, fingerprint FROM index_versions
             WHERE state = $2 AND updated_at < $1 ORDER BY tenant, fingerprint"
        )
        .bind(cutoff_ms)
        .bind(IndexVersionState::Retired.as_str())
        .fetch_all(pool)
        .await)
        .map_err(meta("list retired index versions"))
    }

    /// Keep a store accepted without a vector until it can be embedded.
    pub async fn defer_entry(&self, tenant: &str, entry: &Entry) -> Result<(), BackendError> {
        // Without the vector: there is none yet, and the pass that embeds it computes it.
        let json =
            serde_json::to_string(&entry.without_vector()).map_err(|e| BackendError::Decode {
                table: "pending_entries".into(),
                reason: format!("failed to encode a deferred store: {e}"),
            })?;
        on_pool!(self, |pool| sqlx::query(
            "INSERT INTO pending_entries (id, tenant, scope, namespace, entry, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)"
        )
        .bind(&entry.id)
        .bind(tenant)
        .bind(&entry.scope)
        .bind(&entry.namespace)
        .bind(json)
        .bind(entry.created_at_ms)
        .execute(pool)
        .await
        .map(|_| ()))
        .map_err(meta("keep a store for embedding later"))
    }

    /// Claim up to `limit` of the tenant's pending entries until `until_ms` (another replica
    /// takes them over after that if this one dies before finishing).
    pub async fn claim_pending(
        &self,
        tenant: &str,
        limit: usize,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<Entry>, BackendError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // The outer `claimed_until` check is re-evaluated on a row another replica updated
        // first (Postgres), so two replicas never claim the same row.
        let rows: Vec<String> = on_pool!(self, |pool| sqlx::query_scalar(
            "UPDATE pending_entries SET claimed_until = $1
             WHERE id IN (SELECT id FROM pending_entries
                          WHERE tenant = $2 AND claimed_until < $3
                          ORDER BY created_at LIMIT $4)
               AND claimed_until < $5
             RETURNING entry"
        )
        .bind(until_ms)
        .bind(tenant)
        .bind(now_ms)
        .bind(limit)
        .bind(now_ms)
        .fetch_all(pool)
        .await)
        .map_err(meta("claim pending entries"))?;
        Ok(rows
            .iter()
            .filter_map(|r| serde_json::from_str(r).ok())
            .collect())
    }

    /// Give claimed pending entries back (the embedder failed): any replica may retry them now.
    pub async fn release_pending(&self, tenant: &str, ids: &[String]) -> Result<(), BackendError> {
        for id in ids {
            on_pool!(self, |pool| sqlx::query(
                "UPDATE pending_entries SET claimed_until = 0 WHERE tenant = $1 AND id = $2"
            )
            .bind(tenant)
            .bind(id)
            .execute(pool)
            .await
            .map(|_| ()))
            .map_err(meta("release a pending entry"))?;
        }
        Ok(())
    }

    /// Drop pending entries (embedded and stored, or deleted); returns the ones that existed.
    pub async fn remove_pending(
        &self,
        tenant: &str,
        ids: &[String],
    ) -> Result<Vec<Entry>, BackendError> {
        let mut out = Vec::new();
        for id in ids {
            let row: Option<String> = on_pool!(self, |pool| sqlx::query_scalar(
                "DELETE FROM pending_entries WHERE tenant = $1 AND id = $2 RETURNING entry"
            )
            .bind(tenant)
            .bind(id)
            .fetch_optional(pool)
            .await)
            .map_err(meta("remove a pending entry"))?;
            out.extend(row.and_then(|r| serde_json::from_str(&r).ok()));
        }
        Ok(out)
    }

    /// Drop the tenant's pending entries that `filter` matches; returns them.
    pub async fn remove_pending_where(
        &self,
        tenant: &str,
        filter: &EntryFilter,
    ) -> Result<Vec<Entry>, BackendError> {
        let (column, value) = match filter {
            EntryFilter::All => ("'all'", "all"),
            EntryFilter::Scope(s) => ("scope", s.as_str()),
            EntryFilter::Namespace(n) => ("namespace", n.as_str()),
        };
        let sql = format!(
            "DELETE FROM pending_entries WHERE tenant = $1 AND {column} = $2 RETURNING entry"
        );
        let rows: Vec<String> = on_pool!(self, |pool| sqlx::query_scalar(&sql)
            .bind(tenant)
            .bind(value)
            .fetch_all(pool)
            .await)
        .map_err(meta("remove pending entries"))?;
        Ok(rows
            .iter()
            .filter_map(|r| serde_json::from_str(r).ok())
            .collect())
    }

    /// How many stores wait for the embedder.
    pub async fn pending_count(&self, tenant: &str) -> Result<u64, BackendError> {
        let n: i64 = on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT COUNT(*) FROM pending_entries WHERE tenant = $1"
        )
        .bind(tenant)
        .fetch_one(pool)
        .await)
        .map_err(meta("count pending entries"))?;
        Ok(to_u64(n))
    }

    /// Every row of every table, for a backup.
    pub async fn export(&self) -> Result<MetadataSnapshot, BackendError> {
        on_pool!(self, |pool| {
            let tenants = sqlx::query_as::<_, (String, i64)>(
                "SELECT name, created_at FROM tenants ORDER BY name",
            )
            .fetch_all(pool)
            .await
            .map_err(meta("export tenants"))?;
            let index_versions = sqlx::query_as::<_, (String, String, i64, String, i64, i64)>(
                "SELECT tenant, fingerprint, dimension, state, created_at, updated_at
                 FROM index_versions ORDER BY tenant, fingerprint",
            )
            .fetch_all(pool)
            .await
            .map_err(meta("export index versions"))?;
            let usage = sqlx::query_as::<_, (String, String, String, i64, i64, i64, f64)>(
                "SELECT tenant, model, day, lookups, hits, tokens_saved, usd_saved
                 FROM usage ORDER BY tenant, model, day",
            )
            .fetch_all(pool)
            .await
            .map_err(meta("export usage"))?;
            let hit_audit = sqlx::query_as::<_, (i64, String, String, String, String, f64)>(
                "SELECT at_ms, tenant, request_id, entry_id, path, similarity
                 FROM hit_audit ORDER BY id",
            )
            .fetch_all(pool)
            .await
            .map_err(meta("export the hit audit trail"))?;
            let spend = sqlx::query_as::<_, (String, String, String, i64, i64, f64)>(
                "SELECT tenant, model, day, upstream_calls, tokens_used, usd_spent
                 FROM usage WHERE upstream_calls > 0 ORDER BY tenant, model, day",
            )
            .fetch_all(pool)
            .await
            .map_err(meta("export spend"))?;
            let feedback = sqlx::query(READ_FEEDBACK)
                .bind(0i64)
                .bind(i64::MAX)
                .fetch_all(pool)
                .await
                .map_err(meta("export feedback"))?
                .iter()
                .map(|r| feedback_of(r).map(|f| FeedbackRow::from(&f)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(meta("decode feedback"))?;
            Ok(MetadataSnapshot {
                tenants,
                index_versions,
                usage,
                hit_audit,
                feedback,
                spend,
            })
        })
    }

    /// True when no tenant and no index version is recorded (a restore target).
    pub async fn is_empty(&self) -> Result<bool, BackendError> {
        let n: i64 = on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM tenants) + (SELECT COUNT(*) FROM index_versions)"
        )
        .fetch_one(pool)
        .await)
        .map_err(meta("count tenants"))?;
        Ok(n == 0)
    }

    /// Load a backup's rows, in one transaction.
    pub async fn import(&self, snap: &MetadataSnapshot) -> Result<(), BackendError> {
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await.map_err(meta("begin a transaction"))?;
            for (name, created_at) in &snap.tenants {
                sqlx::query("INSERT INTO tenants (name, created_at) VALUES ($1, $2)")
                    .bind(name)
                    .bind(created_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(meta("restore tenants"))?;
            }
            for (tenant, fp, dim, state, created, updated) in &snap.index_versions {
                sqlx::query(
                    "INSERT INTO index_versions
                       (tenant, fingerprint, dimension, state, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(tenant)
                .bind(fp)
                .bind(dim)
                .bind(state)
                .bind(created)
                .bind(updated)
                .execute(&mut *tx)
                .await
                .map_err(meta("restore index versions"))?;
            }
            for (tenant, model, day, lookups, hits, tokens, usd) in &snap.usage {
                sqlx::query(
                    "INSERT INTO usage (tenant, model, day, lookups, hits, tokens_saved, usd_saved)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(tenant)
                .bind(model)
                .bind(day)
                .bind(lookups)
                .bind(hits)
                .bind(tokens)
                .bind(usd)
                .execute(&mut *tx)
                .await
                .map_err(meta("restore usage"))?;
            }
            for (tenant, model, day, calls, tokens, usd) in &snap.spend {
                sqlx::query(UPSERT_USAGE)
                    .bind(tenant)
                    .bind(model)
                    .bind(day)
                    .bind(0i64)
                    .bind(0i64)
                    .bind(0i64)
                    .bind(0f64)
                    .bind(calls)
                    .bind(tokens)
                    .bind(usd)
                    .execute(&mut *tx)
                    .await
                    .map_err(meta("restore spend"))?;
            }
            for (at_ms, tenant, request_id, entry_id, path, similarity) in &snap.hit_audit {
                sqlx::query(INSERT_AUDIT)
                    .bind(at_ms)
                    .bind(tenant)
                    .bind(request_id)
                    .bind(entry_id)
                    .bind(path)
                    .bind(similarity)
                    .execute(&mut *tx)
                    .await
                    .map_err(meta("restore the hit audit trail"))?;
            }
            for f in &snap.feedback {
                sqlx::query(INSERT_FEEDBACK)
                    .bind(&f.tenant)
                    .bind(&f.entry_id)
                    .bind(&f.request_id)
                    .bind(f.correct)
                    .bind(&f.prompt)
                    .bind(f.vector.as_deref().map(vector_bytes))
                    .bind(&f.index_version)
                    .bind(f.score)
                    .bind(f.at_ms)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(meta("restore feedback"))?;
            }
            tx.commit().await.map_err(meta("commit the restore"))
        })?;
        Ok(())
    }

    pub async fn usage(&self, tenant: &str) -> Result<Vec<ModelUsage>, BackendError> {
        Ok(self
            .usage_totals(UsageKey::Model, tenant, "")
            .await?
            .into_iter()
            .map(DayUsage::for_model)
            .collect())
    }

    /// A tenant's totals per day from `since` (inclusive), oldest first.
    pub async fn usage_by_day(
        &self,
        tenant: &str,
        since: &str,
    ) -> Result<Vec<DayUsage>, BackendError> {
        self.usage_totals(UsageKey::Day, tenant, since).await
    }

    /// A tenant's usage from the day `since` on, summed by `key` (in `DayUsage::day`), in
    /// the key's order.
    async fn usage_totals(
        &self,
        key: UsageKey,
        tenant: &str,
        since: &str,
    ) -> Result<Vec<DayUsage>, BackendError> {
        let column = match key {
            UsageKey::Model => "model",
            UsageKey::Day => "day",
        };
        let sql = format!(
            "SELECT {column} AS key, {USAGE_SUMS} FROM usage WHERE tenant = $1 AND day >= $2
             GROUP BY {column} ORDER BY {column}"
        );
        on_pool!(self, |pool| {
            let rows = sqlx::query(&sql)
                .bind(tenant)
                .bind(since)
                .fetch_all(pool)
                .await
                .map_err(meta("read usage"))?;
            rows.iter()
                .map(|r| {
                    Ok(DayUsage {
                        day: r.try_get("key")?,
                        lookups: to_u64(r.try_get("lookups")?),
                        hits: to_u64(r.try_get("hits")?),
                        tokens_saved: to_u64(r.try_get("tokens_saved")?),
                        usd_saved: r.try_get("usd_saved")?,
                        upstream_calls: to_u64(r.try_get("upstream_calls")?),
                        tokens_used: to_u64(r.try_get("tokens_used")?),
                        usd_spent: r.try_get("usd_spent")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(meta("decode usage"))
        })
    }

    /// Keep one verdict; returns its seq.
    pub async fn record_feedback(&self, f: &FeedbackRow) -> Result<i64, BackendError> {
        let vector = f.vector.as_deref().map(vector_bytes);
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await.map_err(meta("begin a transaction"))?;
            if matches!(self, MetadataStore::Postgres(_)) {
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(FEEDBACK_LOCK)
                    .execute(&mut *tx)
                    .await
                    .map_err(meta("order feedback"))?;
            }
            let seq: i64 = sqlx::query_scalar(INSERT_FEEDBACK)
                .bind(&f.tenant)
                .bind(&f.entry_id)
                .bind(&f.request_id)
                .bind(f.correct)
                .bind(&f.prompt)
                .bind(vector)
                .bind(&f.index_version)
                .bind(f.score)
                .bind(f.at_ms)
                .fetch_one(&mut *tx)
                .await
                .map_err(meta("record feedback"))?;
            tx.commit().await.map_err(meta("commit feedback"))?;
            Ok(seq)
        })
    }

    /// Verdicts with a seq above `after`, oldest first.
    pub async fn feedback_since(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Feedback>, BackendError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        on_pool!(self, |pool| {
            sqlx::query(READ_FEEDBACK)
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await
                .map_err(meta("read feedback"))?
                .iter()
                .map(feedback_of)
                .collect::<Result<Vec<_>, _>>()
                .map_err(meta("decode feedback"))
        })
    }

    /// The entry the audit trail says served `request_id`.
    pub async fn served_entry(
        &self,
        tenant: &str,
        request_id: &str,
    ) -> Result<Option<String>, BackendError> {
        on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT entry_id FROM hit_audit WHERE tenant = $1 AND request_id = $2
             ORDER BY id DESC LIMIT 1"
        )
        .bind(tenant)
        .bind(request_id)
        .fetch_optional(pool)
        .await)
        .map_err(meta("find a served request"))
    }

    /// Number of audited hits of a tenant.
    pub async fn audited_hits(&self, tenant: &str) -> Result<u64, BackendError> {
        let n: i64 = on_pool!(self, |pool| sqlx::query_scalar(
            "SELECT COUNT(*) FROM hit_audit WHERE tenant = $1"
        )
        .bind(tenant)
        .fetch_one(pool)
        .await)
        .map_err(meta("count audited hits"))?;
        Ok(to_u64(n))
    }

    async fn write_batch(&self, events: &[UsageEvent]) -> Result<(), BackendError> {
        // Aggregate per (tenant, model, day) so a batch is a handful of upserts.
        let mut totals: HashMap<(String, String, String), ModelUsage> = HashMap::new();
        for e in events {
            let t = totals
                .entry((e.tenant.clone(), e.model.clone(), day_of(e.at_ms)))
                .or_default();
            // Saturating: one bad value must not stop the writer every tenant shares.
            if let Some(u) = e.upstream {
                t.upstream_calls = t.upstream_calls.saturating_add(1);
                t.tokens_used = t.tokens_used.saturating_add(u.tokens);
                t.usd_spent += u.usd;
                continue;
            }
            t.lookups = t.lookups.saturating_add(1);
            t.hits = t.hits.saturating_add(u64::from(e.hit));
            t.tokens_saved = t.tokens_saved.saturating_add(e.tokens_saved);
            t.usd_saved += e.usd_saved;
        }
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await.map_err(meta("begin a transaction"))?;
            for ((tenant, model, day), t) in &totals {
                sqlx::query(UPSERT_USAGE)
                    .bind(tenant)
                    .bind(model)
                    .bind(day)
                    .bind(to_i64(t.lookups))
                    .bind(to_i64(t.hits))
                    .bind(to_i64(t.tokens_saved))
                    .bind(t.usd_saved)
                    .bind(to_i64(t.upstream_calls))
                    .bind(to_i64(t.tokens_used))
                    .bind(t.usd_spent)
                    .execute(&mut *tx)
                    .await
                    .map_err(meta("record usage"))?;
            }
            // One multi-row INSERT per chunk: a statement per hit would cost a round trip to
            // the database (for SQLite, a hop to its worker thread) on every audited hit.
            let hits: Vec<&UsageEvent> = events.iter().filter(|e| e.hit).collect();
            for chunk in hits.chunks(AUDIT_ROWS_PER_STATEMENT) {
                let mut insert = sqlx::QueryBuilder::new(INSERT_AUDIT_ROWS);
                insert.push_values(chunk, |mut row, e| {
                    row.push_bind(e.at_ms)
                        .push_bind(e.tenant.as_str())
                        .push_bind(e.request_id.as_str())
                        .push_bind(e.entry_id.as_deref().unwrap_or(""))
                        .push_bind(e.path.unwrap_or(""))
                        .push_bind(f64::from(e.similarity.unwrap_or(0.0)));
                });
                insert
                    .build()
                    .execute(&mut *tx)
                    .await
                    .map_err(meta("record hits in the audit trail"))?;
            }
            tx.commit().await.map_err(meta("commit usage"))
        })?;
        Ok(())
    }
}

/// What usage totals are summed by.
#[derive(Clone, Copy)]
enum UsageKey {
    Model,
    Day,
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
            let mut batch = Vec::with_capacity(4096);
            let mut window = tokio::time::interval(USAGE_BATCH_WINDOW);
            window.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // Wait for the first event, then for the rest of the window (unless the queue
                // closed: shutdown drains what is left without waiting).
                if rx.recv_many(&mut batch, 4096).await == 0 {
                    break;
                }
                if !rx.is_closed() {
                    window.tick().await;
                }
                while batch.len() < USAGE_BATCH_MAX {
                    match rx.try_recv() {
                        Ok(event) => batch.push(event),
                        Err(_) => break,
                    }
                }
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

// The domain's ports over the same tables: the inherent methods keep the backend's error, the
// ports hand it on as the domain's `StoreError`.
#[async_trait::async_trait]
impl PendingStore for MetadataStore {
    async fn defer(&self, tenant: &str, entry: &Entry) -> Result<(), StoreError> {
        Ok(self.defer_entry(tenant, entry).await?)
    }

    async fn claim(
        &self,
        tenant: &str,
        limit: usize,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<Entry>, StoreError> {
        Ok(self.claim_pending(tenant, limit, now_ms, until_ms).await?)
    }

    async fn release(&self, tenant: &str, ids: &[String]) -> Result<(), StoreError> {
        Ok(self.release_pending(tenant, ids).await?)
    }

    async fn remove(&self, tenant: &str, ids: &[String]) -> Result<Vec<Entry>, StoreError> {
        Ok(self.remove_pending(tenant, ids).await?)
    }

    async fn remove_where(
        &self,
        tenant: &str,
        filter: &EntryFilter,
    ) -> Result<Vec<Entry>, StoreError> {
        Ok(self.remove_pending_where(tenant, filter).await?)
    }
}

#[async_trait::async_trait]
impl FeedbackStore for MetadataStore {
    async fn record(&self, feedback: &Feedback) -> Result<i64, StoreError> {
        Ok(self.record_feedback(&FeedbackRow::from(feedback)).await?)
    }

    async fn since(&self, after: i64, limit: usize) -> Result<Vec<Feedback>, StoreError> {
        Ok(self.feedback_since(after, limit).await?)
    }

    async fn served(&self, tenant: &str, request_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.served_entry(tenant, request_id).await?)
    }
}

#[async_trait::async_trait]
impl UsageReport for MetadataStore {
    async fn usage(&self, tenant: &str) -> Result<Vec<ModelUsage>, StoreError> {
        Ok(MetadataStore::usage(self, tenant).await?)
    }

    async fn usage_by_day(&self, tenant: &str, since: &str) -> Result<Vec<DayUsage>, StoreError> {
        Ok(MetadataStore::usage_by_day(self, tenant, since).await?)
    }
}

#[cfg(test)]
mod tests {
    use semantis_cache::vector::day_of;

    #[test]
    fn days_are_utc_calendar_dates() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(951_782_400_000), "2000-02-29");
        assert_eq!(day_of(1_795_392_000_000), "2026-11-23");
    }
}
