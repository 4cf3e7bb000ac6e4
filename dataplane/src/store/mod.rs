//! Stores behind traits: the cache domain sees [`EntryStore`] (entries and vectors of one
//! tenant's index version), [`HotLayer`] (exact-match answers) and [`UsageSink`] (accounting
//! and audit, off the hit path). Implementations: LanceDB with a write-ahead tail, an
//! in-process hot layer, and SQLite/Postgres metadata through sqlx.

pub mod dual;
pub mod hot;
pub mod lance;
pub mod metadata;
pub mod redis_hot;
pub mod redis_log;
pub mod resident;
pub mod wal;

use std::sync::Arc;

use async_trait::async_trait;

use crate::cache::entry::{Candidate, Entry, EntryFilter, Removed};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to {action} in LanceDB table `{table}`: {source}")]
    Lance {
        action: &'static str,
        table: String,
        #[source]
        source: Box<lancedb::Error>,
    },
    #[error("failed to {action} the write-ahead log at {path}: {source}")]
    Wal {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to {action} in the metadata store: {source}")]
    Metadata {
        action: &'static str,
        #[source]
        source: Box<sqlx::Error>,
    },
    #[error("failed to {action} Redis key `{key}`: {source}")]
    Redis {
        action: &'static str,
        key: String,
        #[source]
        source: Box<redis::RedisError>,
    },
    #[error("failed to decode stored entries of `{table}`: {reason}")]
    Decode { table: String, reason: String },
    #[error("failed to embed for the migration target index version: {0}")]
    TargetEmbed(String),
    #[error(transparent)]
    Resident(#[from] resident::ResidentError),
    #[error("failed to write: the write-ahead log of `{0}` is closed")]
    Closed(String),
}

/// Entries and vectors of one (tenant, index version).
#[async_trait]
pub trait EntryStore: Send + Sync {
    /// Store durably: when this returns Ok the entry survives a crash.
    async fn insert(&self, entry: Arc<Entry>) -> Result<(), StoreError>;
    async fn find_exact(
        &self,
        exact_key: &str,
        now_ms: i64,
    ) -> Result<Option<Arc<Entry>>, StoreError>;
    /// The `limit` live entries of `scope` nearest to `vector`, best first. The scope filter
    /// is applied before the nearest-neighbour search. `hit_threshold` is the similarity the
    /// caller counts as a hit: an approximate search that finds nothing that close searches
    /// harder before it answers.
    async fn search(
        &self,
        scope: &str,
        vector: &[f32],
        limit: usize,
        hit_threshold: f32,
        now_ms: i64,
    ) -> Result<Vec<Candidate>, StoreError>;
    async fn delete_ids(&self, ids: &[String]) -> Result<Vec<Removed>, StoreError>;
    async fn delete_where(&self, filter: &EntryFilter) -> Result<Vec<Removed>, StoreError>;
    /// Ids of entries whose TTL has passed, at most `limit`.
    async fn expired_ids(&self, now_ms: i64, limit: usize) -> Result<Vec<String>, StoreError>;
    /// (id, created_at) of every stored entry, to seed eviction tracking at startup.
    async fn all_ids(&self) -> Result<Vec<(String, i64)>, StoreError>;
    async fn count_live(&self, now_ms: i64) -> Result<u64, StoreError>;
    /// Whether searches go through an ANN index (as this replica knows it).
    fn has_vector_index(&self) -> bool {
        false
    }
    /// Whether lookups are answered from the resident index (loaded, enabled).
    fn resident_index(&self) -> bool {
        false
    }
    /// Move the write-ahead tail into the table now.
    async fn flush(&self) -> Result<(), StoreError>;
    /// Flush when due, then compact, prune and index when the counts say so.
    async fn maintain(&self) -> Result<(), StoreError>;
    /// Flush what this replica may flush and give up any lease (graceful shutdown).
    async fn shutdown(&self) -> Result<(), StoreError>;
}

/// The exact-match hot layer, keyed by (tenant, exact key). Best effort: failures are misses.
#[async_trait]
pub trait HotLayer: Send + Sync {
    async fn get(&self, tenant: &str, exact_key: &str) -> Option<Arc<Entry>>;
    async fn put(&self, tenant: &str, entry: Arc<Entry>);
    async fn remove(&self, tenant: &str, exact_key: &str);
    async fn clear_tenant(&self, tenant: &str);
}

/// One lookup's outcome for usage accounting and the audit trail.
#[derive(Debug, Clone)]
pub struct UsageEvent {
    pub tenant: String,
    pub model: String,
    pub at_ms: i64,
    pub hit: bool,
    pub path: Option<&'static str>,
    pub entry_id: Option<String>,
    pub similarity: Option<f32>,
    pub request_id: String,
    pub tokens_saved: u64,
    pub usd_saved: f64,
}

/// Where usage events go. Never blocks the caller: nothing on the hit path waits for the
/// metadata database.
pub trait UsageSink: Send + Sync {
    fn record(&self, event: UsageEvent);
}

/// A dependency `/readyz` reports on. None of them is on the lookup path's critical list:
/// lookups keep answering without any of them, so they degrade readiness, never fail it.
#[async_trait]
pub trait Probe: Send + Sync {
    fn name(&self) -> &'static str;
    async fn check(&self) -> Result<(), String>;
}

#[async_trait]
impl Probe for metadata::MetadataStore {
    fn name(&self) -> &'static str {
        self.backend()
    }

    async fn check(&self) -> Result<(), String> {
        self.ping().await.map_err(|e| e.to_string())
    }
}

/// Redis, in cluster mode: stores need it (the log), lookups do not.
pub struct RedisProbe(pub redis::aio::ConnectionManager);

#[async_trait]
impl Probe for RedisProbe {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn check(&self) -> Result<(), String> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.0.clone())
            .await
            .map(|_| ())
            .map_err(|e| format!("failed to reach Redis: {e}"))
    }
}
